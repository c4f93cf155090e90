"""kNN, CKA and sweeps read from a real (small, synthetic) store: streaming in chunk-aligned slabs
gives the in-memory answer, runs are aligned by image, and the CLI prints the numbers as JSON."""

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

import cli.cka  # noqa: F401  (each registers its command on cli.app.app)
import cli.knn  # noqa: F401
import cli.sweep  # noqa: F401
from cli.app import app
from featurestore.pooling import pooled
from featurestore.store import FeatureStore
from pipelines.analysis.cka import cka_run, grid_views, linear_cka
from pipelines.analysis.knn import knn_accuracy, knn_run, l2_normalized, search_topk
from pipelines.analysis.sweep import save_sweep, sweep_run
from pipelines.heads.logistic import probe_run

N, CHUNK = 120, 8
BLOCKS = {"b0": (6, 2, 2), "b1": (3, 2, 2)}
TIMESTEPS = [10, 50]
FAILED_ROW = 5


def synthetic_features(rng, labels):
    """Per (t, block): a class signal that fades with t, plus noise."""
    out = {}
    for t in TIMESTEPS:
        for block, (c, h, w) in BLOCKS.items():
            x = rng.normal(size=(len(labels), c, h, w)).astype(np.float32)
            x[np.arange(len(labels)), labels % c] += 3.0 * 10 / t
            out[(t, block)] = x
    return out


def add_run(store, spec, features, table_rows, failed=()):
    run = store.create_run(spec, arrays=BLOCKS, timesteps=TIMESTEPS, rows=table_rows, chunk_rows=CHUNK,
                           dtype="float32", provenance={})
    for chunk in range(run.n_chunks):
        s = run.chunk_slice(chunk)
        flags = np.isin(np.arange(s.start, s.stop), failed)
        run.write_chunk(chunk, {key: x[s] for key, x in features.items()}, flags, ["bad" if f else "" for f in flags])
    return run


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A store with one run over N images (one failed row) and its features in memory."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, N)
    path = tmp_path_factory.mktemp("analysis") / "store.zarr"
    store = FeatureStore.open(str(path), mode="a")
    ids = [f"img{i}" for i in range(N)]
    table_rows = store.add_images("synthetic", {
        "id": ids, "label": labels, "class_name": [f"c{v}" for v in labels], "split": ["train", "test"] * (N // 2),
        "domain": ["x"] * N, "source": ids,
    })
    features = synthetic_features(rng, labels)
    run = add_run(store, {"run": "a"}, features, table_rows, failed=[FAILED_ROW])
    return {"path": path, "store": store, "run": run, "features": features, "labels": labels, "table_rows": table_rows}


def usable():
    return np.setdiff1d(np.arange(N), [FAILED_ROW])


def test_knn_streamed_in_chunk_slabs_equals_one_search(built):
    rows = usable()
    train, test = rows[rows % 2 == 0], rows[rows % 2 == 1]
    x = l2_normalized(pooled(built["features"][(10, "b0")], None))
    sims, indices = search_topk(x[train], x[test], 20)
    expected = knn_accuracy(sims, indices, built["labels"][train], built["labels"][test], [1, 5, 20])
    for slab_rows in (1, CHUNK, 3 * CHUNK, 10**6):
        result = knn_run(built["store"], None, 10, "b0", [1, 5, 20], pool=None, slab_rows=slab_rows)
        assert (result.train, result.test) == (len(train), len(test))
        assert {k: (result.top1[k], result.top5[k]) for k in (1, 5, 20)} == expected
    assert 0.5 < result.top1[20] <= 1.0
    with pytest.raises(ValueError, match="k must be between 1 and the 60 train images"):
        knn_run(built["store"], None, 10, "b0", [61], pool=None)


def test_cka_grids_stream_to_the_in_memory_values(built):
    rows = usable()
    f = {key: pooled(x, None)[rows] for key, x in built["features"].items()}
    store = built["store"]
    blocks = cka_run(*grid_views(store, "blocks", timestep=50), grid="blocks", pool=None, slab_rows=CHUNK)
    assert (blocks.rows, blocks.cols, blocks.method, blocks.images) == (["b0", "b1"], ["b0", "b1"], "feature", N - 1)
    expected = linear_cka(f[(50, "b0")], f[(50, "b1")])
    for name in ("biased", "unbiased"):
        assert blocks.matrices[name][0][1] == pytest.approx(expected[name], abs=1e-9)
        assert blocks.matrices[name][1][0] == pytest.approx(expected[name], abs=1e-9)
    times = cka_run(*grid_views(store, "timesteps", block="b1"), grid="timesteps", pool=None, slab_rows=2 * CHUNK)
    assert times.rows == ["t=10", "t=50"] and times.name.startswith("cka-timesteps-feature-") and "-b1-" in times.name
    assert times.matrices["unbiased"][0][1] == pytest.approx(linear_cka(f[(10, "b1")], f[(50, "b1")])["unbiased"], abs=1e-9)
    minibatch = cka_run(*grid_views(store, "blocks", timestep=50), grid="blocks", pool=None, method="minibatch",
                        batch_size=N)
    assert minibatch.method == "minibatch" and set(minibatch.matrices) == {"unbiased"}
    # auto: gram above the width threshold (b0 + b1 = 36 features), minibatch beyond its memory too
    gram = cka_run(*grid_views(store, "blocks", timestep=50), grid="blocks", pool=None, max_features=35)
    assert gram.method == "gram" and gram.matrices.keys() == blocks.matrices.keys()
    for name, matrix in gram.matrices.items():
        np.testing.assert_allclose(matrix, blocks.matrices[name], atol=1e-12)
    assert cka_run(*grid_views(store, "blocks", timestep=50), grid="blocks", pool=None, max_features=35,
                   gram_memory=0).method == "minibatch"


def test_cka_across_runs_aligns_images_and_refuses_different_images(built, tmp_path):
    store, features = built["store"], built["features"]
    order = np.random.default_rng(1).permutation(N)
    other = add_run(store, {"run": "shuffled"}, {k: x[order] for k, x in features.items()}, built["table_rows"][order])
    try:
        result = cka_run(*grid_views(store, "runs", run_id=built["run"].run_id, timestep=10, other_run_id=other.run_id),
                         grid="runs", pool=None, slab_rows=CHUNK)
        same = cka_run(*grid_views(store, "blocks", run_id=built["run"].run_id, timestep=10), grid="blocks", pool=None)
        np.testing.assert_allclose(result.matrices["unbiased"], same.matrices["unbiased"], atol=1e-9)
        assert result.matrices["unbiased"][0][0] == pytest.approx(1.0, abs=1e-9)
        assert result.images == N - 1  # the failed row of the first run is left out of both
        fewer = add_run(store, {"run": "fewer"}, {k: x[:-8] for k, x in features.items()}, built["table_rows"][:-8])
        with pytest.raises(ValueError, match="cover different images .8 only in the first, 0 only in the second"):
            cka_run(*grid_views(store, "runs", run_id=built["run"].run_id, timestep=10, other_run_id=fewer.run_id),
                    grid="runs", pool=None)
    finally:
        for run_id in set(store.run_ids()) - {built["run"].run_id}:
            del store.group["runs"][run_id]


def test_sweep_rows_are_the_probe_and_knn_numbers(built, tmp_path):
    result = sweep_run(built["store"], None, pool=None, knn_k=5)
    assert [(r.timestep, r.block) for r in result.rows] == [(t, b) for t in TIMESTEPS for b in BLOCKS]
    for row in result.rows:
        probe = probe_run(built["store"], None, row.timestep, row.block, pool=None)
        knn = knn_run(built["store"], None, row.timestep, row.block, [5], pool=None)
        assert (row.linear_top1, row.linear_train_top1, row.features) == (probe.top1, probe.train_top1, probe.features)
        assert (row.knn_top1, row.knn_top5) == (knn.top1[5], knn.top5[5])
    assert result.rows[0].knn_top1 > result.rows[2].knn_top1  # the signal fades with t
    saved = save_sweep(result, tmp_path / "results", built["store"])
    assert [p.suffix for p in saved] == [".json", ".csv", ".png", ".png"]
    assert all(p.stat().st_size > 0 for p in saved)
    with saved[1].open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and float(table[0]["knn_top1"]) == result.rows[0].knn_top1


def invoke_json(args):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_cli_commands_print_their_numbers_as_json(built, tmp_path):
    store, out = str(built["path"]), str(tmp_path / "out")
    knn = invoke_json(["knn", store, "--block", "b0", "--timestep", "10", "--k", "1,20", "--pool", "1", "--out", out, "--json"])
    expected = knn_run(built["store"], None, 10, "b0", [1, 20], pool=1)
    assert knn["top1"] == {"1": expected.top1[1], "20": expected.top1[20]} and knn["features"] == 6
    cka = invoke_json(["cka", store, "--timestep", "50", "--pool", "1", "--out", out, "--json"])
    assert cka["rows"] == ["b0", "b1"] and cka["matrices"]["unbiased"][0][0] == pytest.approx(1.0)
    sweep = invoke_json(["sweep", store, "--pool", "1", "--k", "5", "--blocks", "b1", "--out", out, "--json"])
    assert [(r["timestep"], r["block"]) for r in sweep["rows"]] == [(10, "b1"), (50, "b1")]
    assert 0 <= sweep["rows"][0]["linear_top1"] <= 1
    assert (tmp_path / "out" / f"{cka['name']}.png").is_file()
    assert len(list((tmp_path / "out").glob(f"knn-{knn['run_id']}-t10-b0-*.json"))) == 1
    bad = CliRunner().invoke(app, ["cka", store, "--grid", "timesteps", "--out", out])
    assert bad.exit_code == 1 and "needs --block" in bad.output
    no_gpu = CliRunner().invoke(app, ["knn", store, "--block", "b0", "--timestep", "10", "--pool", "1", "--k", "5", "--device", "cuda"])
    assert no_gpu.exit_code == 1 and "faiss" in no_gpu.output


def test_cka_against_an_expert_run_needs_no_other_timestep(built):
    store, features = built["store"], built["features"]
    expert = store.create_run({"run": "expert"}, arrays=BLOCKS, timesteps=[None], rows=built["table_rows"],
                              chunk_rows=CHUNK, dtype="float32", provenance={})
    for chunk in range(expert.n_chunks):
        s = expert.chunk_slice(chunk)
        expert.write_chunk(chunk, {(None, b): features[(TIMESTEPS[0], b)][s] for b in BLOCKS},
                           np.zeros(s.stop - s.start, bool), [""] * (s.stop - s.start))
    try:
        rows, cols = grid_views(store, "runs", run_id=built["run"].run_id, timestep=TIMESTEPS[0], other_run_id=expert.run_id)
        assert {c.timestep for c in cols} == {None}
        result = cka_run(rows, cols, grid="runs", pool=None)
        assert result.matrices["biased"][0][0] == pytest.approx(1.0, abs=1e-9)  # the same values under t=None
    finally:
        del store.group["runs"][expert.run_id]
