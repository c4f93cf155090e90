"""`featurestore correspond` refusals in one line: maps with fewer than 2 x 2 positions (logits or
pooled features stored as [C, 1, 1]) refused when named and left out, with a note, when not; output
paths under a file refused before anything is computed (--out, --save-matches, --save-predictions);
an unknown split names the splits that exist; a store without a run says to extract first; an
absent timestep is printed as --timestep takes it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from featurestore.store import FeatureStore
from pipelines.dense.runner import PredictionWriter

# Test modules are not a package (importlib import mode): the toy store of test_correspond by name.
if str(Path(__file__).parent) not in sys.path:
    sys.path.append(str(Path(__file__).parent))

from test_correspond import BLOCKS, N, TIMESTEPS, build_toy  # noqa: E402

SMALL = {"logits": (10, 1, 1), "row": (3, 1, 8)}  # one cell; one row of cells


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The toy pairs with the maps of BLOCKS and of SMALL."""
    blocks = {**BLOCKS, **SMALL}
    rng = np.random.default_rng(3)
    features = {(t, b): rng.standard_normal((N, *shape)).astype(np.float32) for t in TIMESTEPS
                for b, shape in blocks.items()}
    return build_toy(tmp_path_factory.mktemp("small") / "s.zarr", features, blocks=blocks)[0]


def invoke(*args):
    return CliRunner().invoke(app, ["correspond", *map(str, args)])


def one_line_error(result) -> str:
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    return result.output


@pytest.mark.parametrize("block, shape", [("logits", "[10, 1, 1]"), ("row", "[3, 1, 8]")])
def test_a_named_map_under_two_by_two_positions_is_refused(small, tmp_path, block, shape):
    output = one_line_error(invoke(small, "--timestep", "10", "--block", f"a,{block}", "--out", tmp_path))
    assert f"block {block!r}" in output and shape in output and "2 x 2 positions" in output
    assert not list(tmp_path.iterdir())  # nothing written


def test_without_blocks_small_maps_are_left_out_and_named(small, tmp_path):
    result = invoke(small, "--timestep", "10", "--out", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [m["block"] for m in doc["maps"]] == ["a", "b"]
    assert doc["blocks_left_out"] == ["logits [10, 1, 1]", "row [3, 1, 8]"]
    text = invoke(small, "--timestep", "10", "--out", tmp_path)
    assert text.exit_code == 0, text.output
    left = [line for line in text.output.splitlines() if line.startswith("left out:")]
    assert len(left) == 1 and "logits [10, 1, 1], row [3, 1, 8]" in left[0]


def test_a_run_of_small_maps_only_is_refused(tmp_path):
    rng = np.random.default_rng(4)
    features = {(t, b): rng.standard_normal((N, *shape)).astype(np.float32) for t in TIMESTEPS
                for b, shape in SMALL.items()}
    path = build_toy(tmp_path / "s.zarr", features, blocks=SMALL)[0]
    output = one_line_error(invoke(path, "--timestep", "10", "--out", tmp_path / "r"))
    assert "no block with at least 2 x 2 positions" in output and "logits [10, 1, 1]" in output
    assert not (tmp_path / "r").exists()


@pytest.fixture
def afile(tmp_path) -> Path:
    path = tmp_path / "afile.txt"
    path.write_text("keep me")
    return path


@pytest.mark.parametrize("where", ["file", "under"])
def test_out_on_a_file_is_refused_naming_the_option(small, afile, where):
    out = afile if where == "file" else afile / "results"
    output = one_line_error(invoke(small, "--timestep", "10", "--block", "a", "--out", out))
    assert output.startswith("error: --out") and str(afile) in output and "Errno" not in output
    assert afile.read_text() == "keep me"


def test_save_matches_under_a_file_is_refused_before_matching(small, afile, tmp_path):
    output = one_line_error(invoke(small, "--timestep", "10", "--block", "a", "--out", tmp_path / "r",
                                   "--save-matches", afile / "x.csv"))
    assert "--save-matches" in output and f"{afile}, which is a file" in output and "Errno" not in output
    assert not (tmp_path / "r").exists()  # refused before the result was computed and saved


@pytest.mark.parametrize("where", ["file", "under"])
def test_save_predictions_on_a_file_is_refused_naming_the_option(afile, where):
    folder = afile if where == "file" else afile / "preds"
    with pytest.raises(ValueError, match="--save-predictions") as caught:
        PredictionWriter(folder)
    assert "Errno" not in str(caught.value) and "\n" not in str(caught.value)
    assert afile.read_text() == "keep me"


def test_an_unknown_split_names_the_splits_of_the_pairs(small, tmp_path):
    output = one_line_error(invoke(small, "--split", "bogus", "--out", tmp_path))
    assert "no image pairs of split 'bogus'" in output and "its pairs are of split test" in output
    assert "declares none" not in output


def test_an_absent_timestep_is_named_as_the_option_takes_it(small, tmp_path):
    output = one_line_error(invoke(small, "--timestep", "none", "--out", tmp_path))
    assert "has no timestep none; timesteps: 10, 20" in output and "None" not in output


def test_a_store_without_a_run_says_to_extract_first(tmp_path):
    store = FeatureStore.open(str(tmp_path / "empty.zarr"), mode="a")
    store.add_images("toypairs", {"id": ["a"], "label": [0], "class_name": ["x"], "split": ["test"],
                                  "domain": ["photo"], "source": ["a"]})
    output = one_line_error(invoke(tmp_path / "empty.zarr", "--out", tmp_path / "r"))
    assert "holds no run yet: extract features first" in output and "(none)" not in output
