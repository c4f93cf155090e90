"""`featurestore --version` and the git commit in a run's provenance."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from featurestore import store as store_module
from featurestore.store import FeatureStore, git_commit, package_version, version_text


def _git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=folder,
                          capture_output=True, text=True, check=True).stdout.strip()


def test_git_commit_of_a_checkout_says_when_tracked_files_changed(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "commit", "-q", "-m", "one")
    short = _git(tmp_path, "rev-parse", "--short", "HEAD")
    (tmp_path / "untracked.txt").write_text("notes")  # untracked files do not count
    assert git_commit(tmp_path) == (short, False)
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == (short, True)


def test_no_checkout_or_no_git_gives_no_commit(tmp_path, monkeypatch):
    assert git_commit(tmp_path) is None  # a folder that is not a checkout
    (tmp_path / ".git").mkdir()  # looks like one, but git refuses it
    assert git_commit(tmp_path) is None

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert git_commit() is None
    assert version_text() == f"featurestore {package_version()}"


def test_version_option_prints_the_version_and_the_checkout_commit():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    commit = git_commit()
    expected = f"featurestore {package_version()}"
    if commit is not None:  # the tests run from a checkout, unless installed elsewhere
        expected += f" (git {commit[0]}{', modified' if commit[1] else ''})"
    assert result.output == expected + "\n"
    assert package_version() != "unknown"


@pytest.mark.parametrize("commit", [("abc1234", True), None])
def test_create_run_records_the_git_commit_when_known(tmp_path, monkeypatch, commit):
    monkeypatch.setattr(store_module, "git_commit", lambda: commit)
    store = FeatureStore.open(tmp_path / "s.zarr", "a")
    rows = store.add_images("toy", {"id": ["a", "b"], "label": [0, 1], "class_name": ["x", "y"],
                                    "split": ["train"] * 2, "domain": ["photo"] * 2, "source": ["a", "b"]})
    run = store.create_run({"dataset": "toy"}, arrays={"b": (1, 1, 1)}, timesteps=[1], rows=np.asarray(rows),
                           chunk_rows=2, dtype="float32", provenance={})
    provenance = store.run(run.run_id).provenance
    assert provenance["package_version"] == package_version()
    if commit is None:
        assert "git_commit" not in provenance and "git_modified" not in provenance
    else:
        assert (provenance["git_commit"], provenance["git_modified"]) == commit
