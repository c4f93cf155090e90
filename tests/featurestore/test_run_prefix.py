"""`--run` takes an unambiguous prefix of a run id (FeatureStore.run, hence every command)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from featurestore.store import FeatureStore, StoreError, run_id_of


@pytest.fixture
def store(tmp_path) -> FeatureStore:
    """Three runs: two whose ids start with the same two characters, and a third."""
    first = {"dataset": "toy", "seed": 0}
    twin = next(spec for seed in itertools.count(1) if run_id_of(spec := {"dataset": "toy", "seed": seed})[:2]
                == run_id_of(first)[:2])
    other = next(spec for seed in itertools.count(1) if run_id_of(spec := {"dataset": "toy", "seed": -seed})[0]
                 != run_id_of(first)[0])
    store = FeatureStore.open(tmp_path / "s.zarr", "a")
    rows = store.add_images("toy", {"id": ["a", "b"], "label": [0, 1], "class_name": ["x", "y"],
                                    "split": ["train"] * 2, "domain": ["photo"] * 2, "source": ["a", "b"]})
    for spec in (first, twin, other):
        store.create_run(spec, arrays={"b": (1, 1, 1)}, timesteps=[1], rows=np.asarray(rows), chunk_rows=2,
                         dtype="float32", provenance={})
    return store


def test_a_unique_prefix_opens_its_run(store):
    for run_id in store.run_ids():
        shortest = next(run_id[:n] for n in range(1, 17)
                        if sum(r.startswith(run_id[:n]) for r in store.run_ids()) == 1)
        assert store.run(shortest).run_id == run_id
        assert store.run(run_id).run_id == run_id


def test_an_ambiguous_prefix_lists_the_matches_and_an_unknown_one_says_no_run(store):
    ids = store.run_ids()
    shared = next(a[:2] for a in ids if sum(b.startswith(a[:2]) for b in ids) == 2)
    with pytest.raises(StoreError, match=f"run id prefix '{shared}' matches 2 runs") as caught:
        store.run(shared)
    assert all(r in str(caught.value) for r in ids if r.startswith(shared))
    with pytest.raises(StoreError, match="no run 'zz' in .*; runs: "):
        store.run("zz")


def test_verify_takes_a_prefix_and_refuses_an_ambiguous_one_in_one_line(store):
    ids = store.run_ids()
    unique = next(r[:4] for r in ids if sum(b.startswith(r[:4]) for b in ids) == 1)
    result = CliRunner().invoke(app, ["verify", store.url, "--run", unique, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["runs"] == [r for r in ids if r.startswith(unique)]
    shared = next(a[:2] for a in ids if sum(b.startswith(a[:2]) for b in ids) == 2)
    result = CliRunner().invoke(app, ["verify", store.url, "--run", shared])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith(f"error: run id prefix '{shared}' matches 2")


@pytest.mark.parametrize("empty", ["", "  "])
def test_an_empty_run_id_is_refused_as_such(store, empty):
    """It once opened the runs folder itself and said the run was never fully created."""
    with pytest.raises(StoreError, match="an empty run id names no run"):
        store.run(empty)
    result = CliRunner().invoke(app, ["verify", store.url, "--run", empty])
    assert result.exit_code == 1 and result.output.startswith("error: an empty run id names no run")
