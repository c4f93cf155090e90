"""Unreadable --weights in one line (pipelines/extract/weights.py, the one checkpoint reader): a
random file, a corrupt zip checkpoint and a cut safetensors file name the file and the reader's
reason without torch's paragraph on `weights_only`; a folder is named as a folder without a
checkpoint; a good checkpoint still loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from pipelines.extract.weights import WeightsError, read_state_dict


@pytest.fixture
def random_file(tmp_path) -> Path:
    path = tmp_path / "rand.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    return path


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and "weights_only" not in text and "Re-running" not in text, text
    return text


def test_a_random_file_is_not_a_readable_checkpoint(random_file):
    with pytest.raises(WeightsError) as caught:
        read_state_dict(random_file)
    text = one_line(caught)
    assert text.startswith(f"{random_file}: not a readable checkpoint (") and text.endswith(")")
    assert "Unsupported operand" in text  # the unpickler's own reason, not its preamble


def test_a_corrupt_zip_checkpoint_gives_the_first_sentence(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save({"w": torch.zeros(3)}, path)
    path.write_bytes(path.read_bytes()[:40])  # a zip without its central directory
    with pytest.raises(WeightsError) as caught:
        read_state_dict(path)
    text = one_line(caught)
    assert text.startswith(f"{path}: not a readable checkpoint (") and "central directory" in text
    assert "internal miniz error" not in text  # the second sentence is dropped


def test_a_cut_safetensors_file_is_one_line(tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(WeightsError) as caught:
        read_state_dict(path)
    assert one_line(caught).startswith(f"cannot read {path} as a safetensors file: ")


def test_a_folder_is_a_folder_without_a_checkpoint(tmp_path):
    folder = tmp_path / "emptydir"
    folder.mkdir()
    with pytest.raises(WeightsError, match="emptydir is a folder without a checkpoint") as caught:
        read_state_dict(folder)
    assert "not found" not in one_line(caught)
    with pytest.raises(WeightsError, match="weights file not found"):
        read_state_dict(tmp_path / "absent.pt")


def test_a_good_checkpoint_still_loads(tmp_path):
    path = tmp_path / "good.pt"
    torch.save({"state_dict": {"w": torch.arange(4.0)}}, path)
    assert torch.equal(read_state_dict(path)["w"], torch.tensor([0.0, 1.0, 2.0, 3.0]))


@pytest.mark.parametrize("backbone", ["ddpm-mnist", "resnet20-cifar10"])
def test_backbones_show_prints_one_line(random_file, tmp_path, backbone):
    folder = tmp_path / "emptydir"
    folder.mkdir()
    for weights, expected in ((random_file, f"{random_file}: not a readable checkpoint (Unsupported operand"),
                              (folder, f"{folder} is a folder without a checkpoint")):
        result = CliRunner().invoke(app, ["backbones", "show", backbone, "--weights", str(weights)])
        assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
        assert expected in result.output
