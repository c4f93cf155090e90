"""Bad input that used to end in a traceback (or to be followed silently) ends in one `error:`
line with exit 1, before anything is written: undecodable file names, a corrupt checkpoint, a
negative label without a classes line, a symbolic link out of the data root, a full disk."""

import errno
import os

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from featurestore.store import WritableRun


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def digit(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(path)


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.output.startswith("error: "), result.output
    return result.output


def test_a_file_name_that_is_not_utf8_refuses_the_manifest_before_writing(tmp_path):
    root = tmp_path / "data"
    digit(root / "c0" / "ok.png")
    digit(root / os.fsdecode(b"c0/\xff.png"))
    (tmp_path / "m.yaml").write_text(f"name: odd\nbuilder: image_folder\nroot: {root}\n")
    store = tmp_path / "s.zarr"
    output = one_error_line(cli("extract", "--manifest", tmp_path / "m.yaml", "--store", store, "--timesteps", "10"))
    assert "not valid UTF-8" in output and r"'c0/\udcff.png'" in output
    assert not store.exists()


def test_a_corrupt_safetensors_file_is_one_line_naming_it(tmp_path):
    weights = tmp_path / "cut.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    store = tmp_path / "s.zarr"
    output = one_error_line(cli("extract", "--dataset", "demo", "--weights", weights, "--store", store))
    assert f"cannot read {weights} as a safetensors file" in output and output.count("\n") == 1
    assert not store.exists()


def test_a_negative_label_without_a_classes_line_is_one_line(tmp_path):
    digit(tmp_path / "a.png")
    digit(tmp_path / "b.png")
    (tmp_path / "m.csv").write_text("id,source,label,class_name,split,domain\n"
                                    "a,a.png,-1,x,test,photo\nb,b.png,0,y,test,photo\n")
    output = one_error_line(cli("extract", "--manifest", tmp_path / "m.csv", "--store", tmp_path / "s.zarr"))
    assert "negative label(s) -1" in output and output.count("\n") == 1


def test_a_symbolic_link_out_of_the_data_root_is_refused_like_dotdot(tmp_path):
    root = tmp_path / "data"
    digit(root / "c0" / "in.png")
    digit(tmp_path / "secret" / "out.png")
    (root / "c0" / "link.png").symlink_to(tmp_path / "secret" / "out.png")
    (root / "c0" / "inner.png").symlink_to(root / "c0" / "in.png")  # a link that stays inside is fine
    (root / "c1").symlink_to(tmp_path / "secret", target_is_directory=True)
    (tmp_path / "m.yaml").write_text(f"name: linked\nbuilder: image_folder\nroot: {root}\n")
    store = tmp_path / "s.zarr"
    output = one_error_line(cli("extract", "--manifest", tmp_path / "m.yaml", "--store", store, "--timesteps", "10"))
    assert "2 files of 'linked' are symbolic links (or under one) that lead outside the root" in output
    assert "'c0/link.png'" in output and "'c1/out.png'" in output and "inner" not in output
    assert not store.exists()


def test_a_full_disk_names_the_store(tmp_path, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(WritableRun, "write_chunk", no_space)
    store = tmp_path / "s.zarr"
    output = one_error_line(cli("extract", "--dataset", "demo", "--limit", "8", "--timesteps", "10", "--store", store))
    assert output.startswith(f"error: no space left on the device of the store {store}") and output.count("\n") == 1
    assert "the same command resumes" in output
