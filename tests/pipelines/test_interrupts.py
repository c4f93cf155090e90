"""Ctrl-C and closed pipes: one line and exit 130 (extract says what is saved, and a re-run
resumes to the uninterrupted arrays), and `featurestore ... | head` ends quietly with exit 141."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.progress import Progress
from typer.testing import CliRunner

from cli.app import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED
from cli.main import app
from featurestore.store import FeatureStore, IncompleteRunError
from featurestore.torch_view import FeatureDataset
from pipelines.extract.runner import ExtractConfig, extract

PROJECT = Path(__file__).resolve().parents[2]
ARGS = ["--dataset", "demo", "--limit", "512", "--timesteps", "50,400", "--chunk-rows", "32", "--batch-size", "16"]
RESUME = re.compile(r"interrupted: (\d+) of 16 chunks of run [0-9a-f]{16} are saved; run the same command again to resume")


def featurestore(*args: str, **kwargs) -> subprocess.Popen:
    """The command in its own process group, as a terminal runs it (Ctrl-C reaches the whole group)."""
    return subprocess.Popen([sys.executable, "-m", "cli.main", *args], cwd=PROJECT, start_new_session=True,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def ctrl_c_once_chunks_are_done(store: Path, *extra: str) -> tuple[int, str]:
    proc = featurestore("extract", *ARGS, "--store", str(store), *extra, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and len(list(store.glob("runs/*/done/c/*"))) < 2:
        time.sleep(0.02)
    assert proc.poll() is None, f"extraction ended before Ctrl-C: {proc.stderr.read()[-2000:]}"
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    return proc.returncode, stderr


def only_run(store: Path):
    (run,) = FeatureStore.open(str(store)).runs()
    return run


@pytest.mark.slow
def test_ctrl_c_during_extract_is_one_line_and_a_rerun_resumes_to_the_same_arrays(tmp_path):
    store = tmp_path / "interrupted.zarr"
    code, stderr = ctrl_c_once_chunks_are_done(store)
    assert code == EXIT_INTERRUPTED, stderr
    assert len(stderr.splitlines()) == 1 and RESUME.fullmatch(stderr.strip()), stderr
    saved = int(RESUME.fullmatch(stderr.strip()).group(1))
    assert 2 <= saved < 16 and only_run(store).done_chunks().sum() == saved
    assert [{k: v for k, v in sess.items() if k != "ended"} for sess in only_run(store).attrs["sessions"]] == [
        {"chunks": saved, "interrupted": True}]  # the interrupted session is recorded too
    # the half-finished run is refused by stage 2 and by the torch view, never read as zeros
    pending = 512 - 32 * saved
    knn = CliRunner().invoke(app, ["knn", str(store), "--block", "block2", "--timestep", "50", "--holdout", "0.5",
                                   "--k", "1", "--out", str(tmp_path / "results")])
    assert knn.exit_code == 1 and knn.output.count("\n") == 1, knn.output
    assert f"is incomplete: {pending} of 512 images pending; re-run the same `featurestore extract`" in knn.output
    with pytest.raises(IncompleteRunError, match=f"{pending} of 512 images pending"):
        FeatureDataset(only_run(store), [(50, "block2")])

    resumed = CliRunner().invoke(app, ["extract", *ARGS, "--store", str(store), "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["chunks_skipped"] == saved
    clean = tmp_path / "clean.zarr"
    assert CliRunner().invoke(app, ["extract", *ARGS, "--store", str(clean), "--json"]).exit_code == 0
    a, b = only_run(store), only_run(clean)
    for t in b.timesteps:
        for block in b.blocks:
            assert a.numpy(t, block).tobytes() == b.numpy(t, block).tobytes(), (t, block)


@pytest.mark.slow
def test_ctrl_c_of_a_dask_extraction_is_one_line(tmp_path):
    code, stderr = ctrl_c_once_chunks_are_done(tmp_path / "dask.zarr", "--workers", "2")
    assert code == EXIT_INTERRUPTED, stderr
    assert len(stderr.splitlines()) == 1 and RESUME.fullmatch(stderr.strip()), stderr


def test_the_resumed_progress_bar_says_how_many_images_are_done(tmp_path, monkeypatch):
    cfg = ExtractConfig(store=str(tmp_path / "s.zarr"), backbone="ddpm-mnist", dataset="demo", limit=64,
                        timesteps=[10], blocks=["block0"], chunk_rows=16)
    extract(cfg)
    (run,) = FeatureStore.open(cfg.store, mode="a").runs()
    run.group["done"][1] = 0  # as if killed before chunk 1 was written
    described = []
    add_task = Progress.add_task
    monkeypatch.setattr(Progress, "add_task", lambda self, description, **kw: described.append(description)
                        or add_task(self, description, **kw))
    assert extract(cfg).chunks_written == 1
    assert described and described[0].endswith("(1 t x 1 blocks, 48 already done)"), described


@pytest.mark.parametrize("command", [["inspect", "{store}", "--json"], ["backbones", "list"],
                                     ["backbones", "show", "ddpm-mnist", "--json"]])
def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path, command):
    store = tmp_path / "s.zarr"
    assert CliRunner().invoke(app, ["extract", "--dataset", "demo", "--limit", "4", "--timesteps", "10",
                                    "--store", str(store)]).exit_code == 0
    proc = featurestore(*[arg.format(store=store) for arg in command], stdout=subprocess.PIPE)
    proc.stdout.close()  # like `| head -c 0`: the reader is gone before the command writes
    _, stderr = proc.communicate(timeout=120)
    assert (proc.returncode, stderr) == (EXIT_BROKEN_PIPE, "")
