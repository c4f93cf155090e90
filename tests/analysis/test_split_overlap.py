"""Train and test sets that share images are refused in one line (`split_rows`, which every command
that turns --train-split/--test-split into rows calls): probe, knn and segment, end to end."""

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from featurestore.store import FeatureStore
from featurestore.targets import RowTargets, write_targets
from pipelines.heads.logistic import resolve_run, split_rows

N, S = 12, 4


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> str:
    """12 images of 2 classes, splits alternating test/train, block "fine" (3, S, S) at t=0, and
    segmentation masks."""
    rng = np.random.default_rng(0)
    path = str(Path(tmp_path_factory.mktemp("overlap")) / "s.zarr")
    store = FeatureStore.open(path, mode="a")
    ids = [f"img{i}" for i in range(N)]
    rows = store.add_images("toy", {"id": ids, "label": [i % 4 // 2 for i in range(N)],
                                    "class_name": [("a", "b")[i % 4 // 2] for i in range(N)],
                                    "split": ["train" if i % 2 else "test" for i in range(N)],
                                    "domain": ["x"] * N, "source": ids})
    run = store.create_run({"dataset": "toy"}, arrays={"fine": (3, S, S)}, timesteps=[0], rows=rows, chunk_rows=N,
                           dtype="float32", provenance={"backbone": {"input": {"size": S}}})
    run.write_chunk(0, {(0, "fine"): rng.normal(size=(N, 3, S, S)).astype(np.float32)}, np.zeros(N, bool), [""] * N)
    masks = rng.integers(0, 2, (N, S, S)).astype(np.uint8)
    info = {"mask": {"classes": ["bg", "fg"], "ignore_index": 255}}
    write_targets(store, "toy", rows, resize="crop", size=S, info=info,
                  load=lambda k: RowTargets((S, S), np.array([1.0, 0.0, 1.0, 0.0]), mask=masks[k]))
    return path


def test_split_rows_refuses_a_shared_image(store_path):
    run = resolve_run(FeatureStore.open(store_path), None)
    train, test = split_rows(run, "train", "test", None, 0)
    assert train.tolist() == list(range(1, N, 2)) and test.tolist() == list(range(0, N, 2))
    with pytest.raises(ValueError, match=f"share {N // 2} images"):
        split_rows(run, "train", "train", None, 0)
    train, test = split_rows(run, "train", "test", 0.5, 0)  # a holdout never overlaps
    assert not set(train.tolist()) & set(test.tolist()) and len(train) + len(test) == N


@pytest.mark.parametrize("command", [
    ["probe", "--block", "fine", "--timestep", "0"],
    ["knn", "--block", "fine", "--timestep", "0", "--k", "1"],
    ["segment", "--block", "fine", "--timestep", "0", "--epochs", "1", "--quiet"],
])
def test_commands_refuse_the_same_split_for_train_and_test(store_path, tmp_path, command):
    args = [command[0], store_path, *command[1:], "--out", str(tmp_path), "--train-split", "train"]
    result = CliRunner().invoke(app, [*args, "--test-split", "train"])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "the train split 'train' and the test split 'train' share 6 images" in result.output
    assert not any(tmp_path.iterdir())  # nothing saved
