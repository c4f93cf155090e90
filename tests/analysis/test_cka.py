"""Linear CKA: the streamed feature-space, Gram-space and minibatch estimators against the direct Gram
formulas, the method rule, and the command's options."""

import itertools
import json
import tracemalloc
from contextlib import contextmanager

import numpy as np
import pytest
from typer.testing import CliRunner

import cli.cka  # noqa: F401  (registers the command on cli.app.app)
from cli.app import app
from featurestore.store import FeatureStore
from pipelines.analysis import cka
from pipelines.analysis.cka import choose_method, cka_matrices, gram_bytes, gram_cka_matrices, linear_cka


def hsic_biased(k, l):
    n = len(k)
    h = np.eye(n) - 1.0 / n
    return np.trace(k @ h @ l @ h) / (n - 1) ** 2


def hsic_unbiased(k, l):
    """Song et al. (2012): the U-statistic with zeroed Gram diagonals."""
    n = len(k)
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    one = np.ones(n)
    return (np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * one @ k @ l @ one) / (n * (n - 3))


def gram_cka(x, y, hsic):
    k, l = x @ x.T, y @ y.T
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def related_pair(rng, n=120, dx=20, dy=12):
    """Y partly a linear map of X, with large feature means (to catch cancellation)."""
    x = rng.normal(size=(n, dx)) + 50 * rng.normal(size=dx)
    y = x @ rng.normal(size=(dx, dy)) + 3 * rng.normal(size=(n, dy)) - 20
    return x, y


def test_both_estimators_equal_the_gram_formulas():
    rng = np.random.default_rng(0)
    for _ in range(3):
        x, y = related_pair(rng)
        ours = linear_cka(x, y)
        assert ours["biased"] == pytest.approx(gram_cka(x, y, hsic_biased), abs=1e-6)
        assert ours["unbiased"] == pytest.approx(gram_cka(x, y, hsic_unbiased), abs=1e-6)
        assert abs(ours["biased"] - ours["unbiased"]) > 1e-3  # the two estimators do differ at this N


def test_identity_orthogonal_and_scale_invariance():
    rng = np.random.default_rng(1)
    x, y = related_pair(rng)
    assert linear_cka(x, x) == pytest.approx({"biased": 1.0, "unbiased": 1.0}, abs=1e-12)
    q, _ = np.linalg.qr(rng.normal(size=(x.shape[1], x.shape[1])))
    reference = linear_cka(x, y)
    assert linear_cka(x @ q, y) == pytest.approx(reference, abs=1e-9)
    assert linear_cka(7.5 * x, 0.01 * y) == pytest.approx(reference, abs=1e-9)


def test_streaming_over_slabs_equals_in_memory():
    rng = np.random.default_rng(2)
    x, y = related_pair(rng, n=203)
    z = rng.normal(size=(203, 5)) + x[:, :5]
    whole, n, _ = cka_matrices([[x, y, z]], "feature")
    cuts = [0, 4, 90, 91, 203]
    streamed, n_streamed, _ = cka_matrices([[v[a:b] for v in (x, y, z)] for a, b in itertools.pairwise(cuts)], "feature")
    assert n == n_streamed == 203
    for name in ("biased", "unbiased"):
        np.testing.assert_allclose(streamed[name], whole[name], atol=1e-10)
        np.testing.assert_allclose(np.diag(whole[name]), 1.0, atol=1e-12)
    assert whole["unbiased"][0, 2] == pytest.approx(gram_cka(x, z, hsic_unbiased), abs=1e-6)


def test_minibatch_of_everything_is_the_full_unbiased_value():
    rng = np.random.default_rng(3)
    x, y = related_pair(rng, n=150)
    minibatch, _, _ = cka_matrices([[x, y]], "minibatch", batch_size=150)
    assert set(minibatch) == {"unbiased"}
    assert minibatch["unbiased"][0, 1] == pytest.approx(linear_cka(x, y)["unbiased"], abs=1e-9)


def test_minibatch_approaches_the_full_value_on_large_n():
    # 20,000 rows in minibatches of 256: the average of unbiased HSICs converges to the full-data
    # value. Measured gaps over seeds: 0.5e-4 to 4e-4; the tolerance is 0.005.
    rng = np.random.default_rng(4)
    x, y = related_pair(rng, n=20000, dx=32, dy=16)
    full = linear_cka(x, y)["unbiased"]
    slabs = [[x[a:a + 4096], y[a:a + 4096]] for a in range(0, 20000, 4096)]
    minibatch, n, _ = cka_matrices(slabs, "minibatch", batch_size=256, seed=0)
    assert n == 20000 and 0.2 < full < 0.8
    assert minibatch["unbiased"][0, 1] == pytest.approx(full, abs=0.005)


# -- Gram space ------------------------------------------------------------------------------------
def u_centred(k):
    """Szekely & Rizzo (2014) eq. 2.2, entry by entry."""
    n = len(k)
    off = k - np.diag(np.diag(k))
    r = off.sum(axis=1)
    u = np.array([[k[i, j] - r[i] / (n - 2) - r[j] / (n - 2) + r.sum() / ((n - 1) * (n - 2)) for j in range(n)]
                  for i in range(n)])
    np.fill_diagonal(u, 0)
    return u


def wide_views(rng, n=60):
    """Four views of n rows: related widths 3..40, large means (cancellation), one a linear map of another."""
    base = rng.normal(size=(n, 6))
    views = [base @ rng.normal(size=(6, d)) + rng.normal(size=(n, d)) + 100 * rng.normal(size=d) for d in (3, 17, 40)]
    views.append(views[1] @ rng.normal(size=(17, 5)) + 0.5 * rng.normal(size=(n, 5)) - 30)
    return views


def test_gram_space_equals_feature_space_and_the_direct_formulas():
    rng = np.random.default_rng(5)
    for n in (7, 60):
        views = wide_views(rng, n)
        gram, images, constant = gram_cka_matrices(iter(views), len(views))
        feature, _, _ = cka_matrices([views], "feature")
        assert images == n and not constant.any() and set(gram) == {"biased", "unbiased"}
        for name in ("biased", "unbiased"):
            np.testing.assert_allclose(gram[name], feature[name], atol=1e-10)
            np.testing.assert_allclose(gram[name], gram[name].T, atol=1e-12)
        # the direct formulas on mean-free views (both estimators ignore a shift; raw, the means of 100
        # cancel in the uncentred Grams' sums to ~1e-8)
        centred = [v - v.mean(axis=0) for v in views]
        for (i, x), (j, y) in itertools.combinations(enumerate(centred), 2):
            assert gram["biased"][i, j] == pytest.approx(gram_cka(x, y, hsic_biased), abs=1e-9)
            assert gram["unbiased"][i, j] == pytest.approx(gram_cka(x, y, hsic_unbiased), abs=1e-9)
        k, l = (v @ v.T for v in centred[:2])
        unbiased = np.sum(u_centred(k) * u_centred(l)) / (n * (n - 3))  # the U-centred form of Song et al.'s value
        assert unbiased == pytest.approx(hsic_unbiased(k, l), rel=1e-9)
        assert gram["unbiased"][0, 1] == pytest.approx(
            unbiased / np.sqrt(np.sum(u_centred(k) ** 2) * np.sum(u_centred(l) ** 2)) * (n * (n - 3)), abs=1e-9)


def test_gram_space_in_column_blocks_and_float32_views(monkeypatch):
    rng = np.random.default_rng(6)
    views = [v.astype(np.float32) for v in wide_views(rng)]
    whole, _, _ = gram_cka_matrices(iter(views), len(views))
    monkeypatch.setattr(cka, "GRAM_COLUMNS", 4)  # the 40-wide view in 10 float64 blocks
    blocked, _, _ = gram_cka_matrices(iter(views), len(views))
    exact, _, _ = cka_matrices([[v.astype(np.float64) for v in views]], "feature")
    for name in ("biased", "unbiased"):
        np.testing.assert_allclose(blocked[name], whole[name], atol=1e-12)
        np.testing.assert_allclose(whole[name], exact[name], atol=1e-10)


def test_gram_space_constant_views_are_undefined():
    rng = np.random.default_rng(7)
    x, y = related_pair(rng, n=50)
    for value in (0.1, 1 / 3, 5e4):
        c = np.full((50, 4), value, np.float32)
        matrices, _, constant = gram_cka_matrices(iter([x, c, y]), 3)
        assert constant.tolist() == [False, True, False]
        for m in matrices.values():
            assert np.isnan(m[1]).all() and np.isnan(m[:, 1]).all() and np.isfinite(m[np.ix_([0, 2], [0, 2])]).all()


def test_gram_space_refuses_mismatched_views():
    rng = np.random.default_rng(8)
    with pytest.raises(ValueError, match="view 2 has 30 rows; expected 2 views of 40 rows"):
        gram_cka_matrices(iter([rng.normal(size=(40, 3)), rng.normal(size=(30, 3))]), 2)
    with pytest.raises(ValueError, match="1 of 2 views given"):
        gram_cka_matrices(iter([rng.normal(size=(40, 3))]), 2)
    with pytest.raises(ValueError, match="at least 4 images, got 3"):
        gram_cka_matrices(iter([rng.normal(size=(3, 3))] * 2), 2)


def test_gram_memory_bound_holds():
    rng = np.random.default_rng(9)
    n, widths = 300, (50, 700, 3000)
    views = [rng.normal(size=(n, d)).astype(np.float32) for d in widths]
    tracemalloc.start()
    gram_cka_matrices((v.copy() for v in views), len(views))  # each copy: the view being read
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    kept = 8 * len(widths) * n * (n - 1) // 2
    assert kept < peak <= gram_bytes(len(widths), n, max(widths))


def test_auto_picks_feature_then_gram_then_minibatch():
    n, widths = 2500, [4096] * 13 + [8192] * 12 + [16384] * 12  # ADM-256's 37 blocks at pool 4
    assert choose_method("auto", [100, 200], n) == "feature"
    assert choose_method("auto", widths, n) == "gram"
    assert gram_bytes(37, n, 16384) / 2**30 == pytest.approx(1.16, abs=0.005)
    assert choose_method("auto", widths, 5000) == "minibatch"  # 3.7 GiB of triangles alone
    assert choose_method("auto", widths, 5000, gram_memory=8) == "gram"
    assert choose_method("feature", widths, 5000) == "feature"
    with pytest.raises(ValueError, match=r"--method gram needs 4\.\d GiB for 37 views of 5000 images, over "
                                         r"--gram-memory 4: raise it, or use --method feature or minibatch"):
        choose_method("gram", widths, 5000)
    with pytest.raises(ValueError, match="--method must be auto, feature, gram or minibatch, got 'fast'"):
        choose_method("fast", widths, n)


# -- the command -----------------------------------------------------------------------------------
N, CHUNK = 40, 8
BLOCKS = {"b0": (6, 2, 2), "b1": (3, 2, 2), "b2": (5, 1, 1)}
TIMESTEPS = [10, 50, 90]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One run: 40 images, three blocks at three timesteps, each a noisy linear map of one latent."""
    rng = np.random.default_rng(10)
    path = tmp_path_factory.mktemp("cka") / "store.zarr"
    fs = FeatureStore.open(str(path), mode="a")
    ids = [f"img{i}" for i in range(N)]
    rows = fs.add_images("synthetic", {"id": ids, "label": [i % 2 for i in range(N)], "class_name": ["c"] * N,
                                       "split": ["train"] * N, "domain": ["x"] * N, "source": ids})
    latent = rng.normal(size=(N, 4))
    features = {(t, b): (latent @ rng.normal(size=(4, int(np.prod(shape)))) + t / 30 * rng.normal(
        size=(N, int(np.prod(shape))))).reshape(N, *shape).astype(np.float32)
        for t in TIMESTEPS for b, shape in BLOCKS.items()}
    run = fs.create_run({"run": "cka"}, arrays=BLOCKS, timesteps=TIMESTEPS, rows=rows, chunk_rows=CHUNK,
                        dtype="float32", provenance={})
    for c in range(run.n_chunks):
        s = run.chunk_slice(c)
        run.write_chunk(c, {k: x[s] for k, x in features.items()}, np.zeros(s.stop - s.start, bool),
                        [""] * (s.stop - s.start))
    return path


def cli_json(*args):
    result = CliRunner().invoke(app, ["cka", *map(str, args), "--pool", "1", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_cli_gram_method_names_itself_and_equals_feature(store, tmp_path):
    feature = cli_json(store, "--timestep", 50, "--method", "feature", "--out", tmp_path)
    gram = cli_json(store, "--timestep", 50, "--method", "gram", "--out", tmp_path, "--quiet")
    auto = cli_json(store, "--timestep", 50, "--max-features", 10, "--out", tmp_path)
    assert (feature["method"], gram["method"], auto["method"]) == ("feature", "gram", "gram")
    assert gram["settings"]["method"] == "gram" and gram["name"].startswith("cka-blocks-gram-")
    for name in ("biased", "unbiased"):
        np.testing.assert_allclose(gram["matrices"][name], feature["matrices"][name], atol=1e-10)
    assert cli_json(store, "--timestep", 50, "--max-features", 10, "--gram-memory", 0, "--out", tmp_path,
                    "--batch-size", 20)["method"] == "minibatch"
    refused = CliRunner().invoke(app, ["cka", str(store), "--timestep", "50", "--method", "gram", "--gram-memory", "0",
                                       "--out", str(tmp_path)])
    assert refused.exit_code == 1 and refused.output.startswith("error: --method gram needs 0.0 GiB for 3 views of 40 ")


def test_cli_block_and_timestep_take_either_spelling(store, tmp_path):
    blocks = cli_json(store, "--timestep", 50, "--out", tmp_path)
    assert cli_json(store, "--timesteps", 50, "--out", tmp_path) == blocks
    assert cli_json(store, "--timesteps", 50, "--blocks", "all", "--out", tmp_path) == blocks
    pair = cli_json(store, "--timestep", 50, "--block", "b0", "--block", "b2", "--out", tmp_path)
    assert cli_json(store, "--timestep", 50, "--blocks", "b0,b2", "--out", tmp_path) == pair
    assert pair["rows"] == ["b0", "b2"] and pair["matrices"]["unbiased"][0][1] == blocks["matrices"]["unbiased"][0][2]

    times = cli_json(store, "--grid", "timesteps", "--block", "b1", "--out", tmp_path)
    assert times["rows"] == ["t=10", "t=50", "t=90"]
    assert cli_json(store, "--grid", "timesteps", "--blocks", "b1", "--timesteps", "all", "--out", tmp_path) == times
    some = cli_json(store, "--grid", "timesteps", "--blocks", "b1", "--timestep", "10", "--timestep", "90", "--out", tmp_path)
    assert some["rows"] == ["t=10", "t=90"] and some["matrices"]["biased"][0][1] == times["matrices"]["biased"][0][2]

    for args, line in [
        (["--timesteps", "10,50"], "error: --grid blocks takes one --timestep, got 10,50; --grid timesteps compares them"),
        (["--grid", "timesteps", "--blocks", "b0,b1"],
         "error: --grid timesteps takes one --block, got b0,b1; --grid blocks compares them"),
        (["--grid", "timesteps"], "error: --grid timesteps needs --block"),
    ]:
        result = CliRunner().invoke(app, ["cka", str(store), *args, "--out", str(tmp_path)])
        assert result.exit_code == 1 and result.output == line + "\n"


def test_cka_run_advances_its_bar_per_view_or_slab(store, monkeypatch):
    steps = []

    @contextmanager
    def recorded(command, description, total):
        steps.append([command, description, total, 0])

        def advance(n=1, description=None):
            steps[-1][3] += n

        yield advance

    monkeypatch.setattr(cka, "bar", recorded)
    fs = FeatureStore.open(str(store))
    cka.cka_run(*cka.grid_views(fs, "blocks", timestep=50), "blocks", pool=None, method="gram")
    cka.cka_run(*cka.grid_views(fs, "blocks", timestep=50), "blocks", pool=None, method="feature", slab_rows=16)
    assert steps == [["cka", "blocks grid, gram, views", 3, 3], ["cka", "blocks grid, feature, slabs", 3, 3]]
