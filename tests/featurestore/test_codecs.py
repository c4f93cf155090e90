"""The lossy codecs of `featurestore extract --codec` (featurestore/codecs.py): their error bounds
against direct formulas, non-finite values kept detectable, stores written with each codec read
back through every view and by plain zarr, resume, run ids, and the refusal of bad names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from store_builders import SPEC
from typer.testing import CliRunner
import xarray as xr

import pipelines.extract.runner as runner
from cli.main import app
from featurestore.codecs import MANTISSA_BITS, bitround, int8_decode, int8_encode, parse_codec
from featurestore.inspect import inspect_store
from featurestore.store import FeatureStore, NonFiniteError, run_id_of, same_spec, timestep_key
from pipelines.extract.runner import ExtractConfig, extract

CODECS = ("zstd", "bitround:4", "int8")
EXTRACT = dict(backbone="ddpm-mnist", dataset="demo", limit=48, timesteps=[10], blocks=["block1", "block2"],
               chunk_rows=16, batch_size=16, progress=False)


def rne_reference(x: np.ndarray, keepbits: int) -> np.ndarray:
    """Round-to-nearest-even of normal numbers to `keepbits` mantissa bits, in float64 with
    frexp: |x| = m * 2^e, m in [0.5, 1), so the kept grid step is 2^(e - 1 - keepbits)."""
    x = x.astype(np.float64)
    _, e = np.frexp(np.abs(x))
    step = np.ldexp(1.0, e - 1 - keepbits)
    return np.sign(x) * np.round(np.abs(x) / step) * step  # np.round: ties to even


def normal_samples(dtype: str, rng: np.random.Generator, n: int = 20000) -> np.ndarray:
    """Normal (not subnormal) numbers of both signs over the dtype's exponent range, kept below
    the top binade (whose rounding may saturate)."""
    info = np.finfo(dtype)
    exponents = rng.uniform(np.log2(info.smallest_normal), np.log2(info.max) - 1, n)
    values = (np.exp2(exponents) * rng.choice([-1, 1], n)).astype(dtype)
    ties = (np.float64(1) + np.arange(1, 64) / 64).astype(dtype)  # mantissas ending in ...1 and ...10: exact ties
    return np.concatenate([values, ties, -ties])


@pytest.mark.parametrize(("dtype", "keepbits"), [("float16", 1), ("float16", 3), ("float16", 9),
                                                  ("float32", 5), ("float32", 22)])
def test_bitround_is_round_to_nearest_even_within_its_bound(dtype, keepbits):
    x = normal_samples(dtype, np.random.default_rng(keepbits))
    before = x.copy()
    r = bitround(x, keepbits)
    assert x.tobytes() == before.tobytes()
    assert r.dtype == x.dtype
    np.testing.assert_array_equal(r.astype(np.float64), rne_reference(x, keepbits))
    assert (np.abs(r.astype(np.float64) - x) <= 2.0 ** -(keepbits + 1) * np.abs(x.astype(np.float64))).all()
    dropped = (1 << (MANTISSA_BITS[dtype] - keepbits)) - 1
    assert not (r.view(np.uint16 if dtype == "float16" else np.uint32) & dropped).any()
    assert (np.signbit(r) == np.signbit(x)).all()


def test_bitround_keeps_zeros_signs_and_nonfinite_values_and_never_makes_inf():
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan], dtype=np.float16)
    payload_nans = np.array([0x7FFF, 0xFFFF, 0x7C01, 0xFE00], dtype=np.uint16).view(np.float16)
    x = np.concatenate([specials, payload_nans])
    r = bitround(x, 3)
    assert r.view(np.uint16).tolist() == x.view(np.uint16).tolist()  # bit for bit
    # values that round-to-nearest would take beyond 65504 keep to the largest 3-bit value, 1.875 * 2^15
    top = np.array([65504, -65504, 65000, 61500], dtype=np.float16)
    r = bitround(top, 3)
    assert r.tolist() == [61440.0, -61440.0, 61440.0, 61440.0]
    assert (np.abs(r.astype(np.float64) - top) <= 2.0 ** -3 * np.abs(top.astype(np.float64))).all()


def channel_bound(x: np.ndarray) -> np.ndarray:
    """Per channel of an (n, C, ...) chunk: scale/2 with scale = (max - min)/255 over the rows that
    are not all zero, as float64 (C,) broadcastable to the chunk."""
    x64 = x.astype(np.float64)
    live = x64[np.abs(x64).reshape(len(x), -1).max(axis=1) > 0]
    axes = (0, *range(2, x.ndim))
    scale = (live.max(axis=axes) - live.min(axis=axes)) / 255
    return (scale / 2).reshape(1, -1, *[1] * (x.ndim - 2))


def assert_int8_bound(x: np.ndarray, y: np.ndarray) -> None:
    """|x - y| <= scale/2 per channel, plus half a unit in the last place of the stored dtype
    (the cast of the float32 result) and float32 rounding of offset + scale * code."""
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    slack = np.spacing(np.abs(y)).astype(np.float64) / 2 + 1e-6 * (np.abs(x64) + np.abs(y64))
    bound = channel_bound(x) * (1 + 1e-6) + slack
    assert (np.abs(x64 - y64) <= bound).all(), float((np.abs(x64 - y64) - bound).max())


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_int8_is_within_half_a_step_per_channel_and_one_byte_per_value(dtype):
    rng = np.random.default_rng(1)
    centres, widths = rng.normal(0, 5, 6), np.exp(rng.uniform(-6, 3, 6))  # every channel its own range
    x = (centres[None, :, None, None] + widths[None, :, None, None] * rng.standard_normal((9, 6, 5, 4))).astype(dtype)
    before = x.copy()
    data = int8_encode(x)
    assert x.tobytes() == before.tobytes()  # the caller's array is left as it was
    assert len(data) == 1 + 2 + 8 * 6 + x.size  # format byte, zero-row bits, offsets, scales, one byte a value
    y = int8_decode(data, x.shape, dtype)
    assert y.dtype == np.dtype(dtype) and y.shape == x.shape
    assert_int8_bound(x, y)
    assert (np.abs(x - y).astype(np.float64) > channel_bound(x) / 4).any()  # it is lossy, not stored as is


def test_int8_constant_channels_and_all_zero_rows_are_exact_and_zero_rows_do_not_widen_the_range():
    rng = np.random.default_rng(2)
    x = (5 + rng.random((8, 3, 4, 4))).astype(np.float16)  # channel ranges within [5, 6], away from zero
    x[:, 1] = np.float16(3.14)  # constant channel
    x[[2, 7]] = 0  # failed images: all-zero rows
    y = int8_decode(int8_encode(x), x.shape, "float16")
    assert (y[:, 1][[0, 1, 3, 4, 5, 6]] == np.float16(3.14)).all()
    assert (y[[2, 7]] == 0).all()
    assert_int8_bound(x, y)  # the bound of the [5, 6] range: the zero rows are not part of it
    assert (int8_decode(int8_encode(np.zeros_like(x)), x.shape, "float16") == 0).all()


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_int8_stores_a_chunk_with_nonfinite_values_as_it_is(bad):
    x = np.random.default_rng(3).standard_normal((4, 2, 3, 3)).astype(np.float16)
    x[1, 0, 2, 2] = bad
    data = int8_encode(x)
    assert data[0] == 0 and len(data) == 1 + x.nbytes
    assert int8_decode(data, x.shape, "float16").tobytes() == x.tobytes()


def test_int8_refuses_bytes_of_another_shape():
    data = int8_encode(np.ones((4, 2, 3, 3), np.float32))
    with pytest.raises(ValueError, match="not a chunk of shape"):
        int8_decode(data, (4, 2, 3, 4), "float32")


def expected_stored(codec: str, values: np.ndarray) -> np.ndarray | None:
    """What a lossless or bitround store must return exactly; None for int8 (checked by its bound)."""
    if codec == "zstd":
        return values
    if codec.startswith("bitround:"):
        return bitround(values, int(codec.split(":")[1]))
    return None


@pytest.mark.parametrize("codec", CODECS)
def test_a_store_written_with_each_codec_reads_back_through_every_view_and_plain_zarr(make_run, tmp_path, codec):
    # every chunk done; rows 1 and 9 failed (all zero)
    w = make_run(dtype="float16", spec={**SPEC, "codec": codec}, done=(0, 1, 2), undone_failed={})
    run = FeatureStore.open(w.path).run(w.run.run_id)
    assert run.codec == codec
    rows = run.usable_rows()
    for key, written in w.data.items():
        values = run.numpy(*key, rows)
        assert values.dtype == np.float16
        exact = expected_stored(codec, written)
        if exact is None:
            for c in range(run.n_chunks):
                s = run.chunk_slice(c)
                assert_int8_bound(written[s], run.read_chunk(*key, c))
        else:
            assert values.tobytes() == exact[rows].tobytes()
        assert run.dask(*key)[rows].compute().tobytes() == values.tobytes()
        assert (run.read_chunk(*key, 0)[1] == 0).all() and (run.read_chunk(*key, 2)[1] == 0).all()  # failed rows
    # a zarr reader that never imports featurestore finds the codecs through their entry points
    script = ("import sys, numpy, zarr; assert 'featurestore' not in sys.modules; numpy.savez(sys.argv[1], "
              "*[zarr.open_array(sys.argv[2], path=p, mode='r')[:] for p in sys.argv[3:]])")
    keys = list(w.data)
    out = tmp_path / "plain.npz"
    done = subprocess.run([sys.executable, "-c", script, str(out), str(w.path), *[run.array_path(*k) for k in keys]],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, f"{done.stderr[-1500:]}\n(after changing pyproject.toml's entry points: make install)"
    plain = np.load(out)
    for k, key in enumerate(keys):
        assert plain[f"arr_{k}"][rows].tobytes() == run.numpy(*key, rows).tobytes(), key
    # and xarray, on a timestep group of the run (zarr dimension_names)
    for (t, block) in keys:
        group = xr.open_zarr(w.path, group=f"runs/{run.run_id}/{timestep_key(t)}", consolidated=False)
        assert group[block].values[rows].tobytes() == run.numpy(t, block, rows).tobytes(), (t, block)


@pytest.mark.parametrize("codec", CODECS)
def test_nonfinite_values_are_counted_and_refused_with_each_codec(make_run, codec):
    w = make_run(dtype="float16", spec={**SPEC, "codec": codec}, done=(0,), failed={}, undone_failed={})
    run = w.store.run(w.run.run_id)
    values = {key: np.random.default_rng(4).standard_normal((4, *v.shape[1:])).astype(np.float16)
              for key, v in w.data.items()}
    key = next(iter(values))
    values[key][2, 0, 0, 0] = np.inf
    values[key][3, 0, 0, 0] = np.nan
    counts = run.write_chunk(1, values, np.zeros(4, bool), [""] * 4)
    assert counts == {key: (2, 2)}
    assert run.nonfinite()[f"{timestep_key(key[0])}/{key[1]}"]["stored"] == 2
    with pytest.raises(NonFiniteError, match="non-finite values .* for 2 images"):
        run.read_chunk(*key, 1)
    stored = run.array(*key)[4:8]  # plain zarr: the values as written
    assert np.isposinf(stored[2, 0, 0, 0]) and np.isnan(stored[3, 0, 0, 0])


def only_run(store: Path):
    (run,) = FeatureStore.open(store).runs()
    return run


@pytest.mark.parametrize("codec", ["bitround:3", "int8"])
def test_a_lossy_run_interrupted_and_resumed_equals_an_uninterrupted_one(tmp_path, monkeypatch, codec):
    clean = extract(ExtractConfig(store=str(tmp_path / "clean.zarr"), codec=codec, **EXTRACT))
    assert clean.chunks_written == 3
    real = runner.run_chunks

    def two_chunks_then_ctrl_c(job, run, todo, **kwargs):
        real(job, run, todo[:2], **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_chunks", two_chunks_then_ctrl_c)
    cfg = ExtractConfig(store=str(tmp_path / "resumed.zarr"), codec=codec, **EXTRACT)
    with pytest.raises(KeyboardInterrupt):
        extract(cfg)
    assert only_run(tmp_path / "resumed.zarr").done_chunks().tolist() == [True, True, False]
    monkeypatch.setattr(runner, "run_chunks", real)
    resumed = extract(cfg)
    assert (resumed.run_id, resumed.chunks_written, resumed.chunks_skipped) == (clean.run_id, 1, 2)
    a, b = only_run(tmp_path / "resumed.zarr"), only_run(tmp_path / "clean.zarr")
    assert a.codec == codec and a.spec["codec"] == codec
    for block in EXTRACT["blocks"]:
        assert a.numpy(10, block).tobytes() == b.numpy(10, block).tobytes(), block


def test_the_run_id_changes_with_the_codec_and_zstd_keeps_the_id_of_specs_without_one(tmp_path):
    job = runner.prepare_job(ExtractConfig(store=str(tmp_path / "unused.zarr"), **EXTRACT))
    specs = {codec: runner.run_spec(runner.replace(job, cfg=runner.replace(job.cfg, codec=codec)), None)
             for codec in ("zstd", "bitround:3", "bitround:4", "int8")}
    ids = {codec: run_id_of(spec) for codec, spec in specs.items()}
    assert len(set(ids.values())) == 4
    assert "codec" not in specs["zstd"] and specs["int8"]["codec"] == "int8"
    assert same_spec(specs["zstd"], {**specs["zstd"], "codec": "zstd"})
    assert not same_spec(specs["zstd"], specs["int8"])
    # a store whose run predates the codec key: extracting with --codec zstd continues it under its id
    result = extract(ExtractConfig(store=str(tmp_path / "s.zarr"), **EXTRACT))
    assert result.run_id == ids["zstd"] == run_id_of({k: v for k, v in specs["zstd"].items() if k != "codec"})
    store = FeatureStore.open(tmp_path / "s.zarr", "a")
    run = store.run(result.run_id)
    again = store.create_run({**specs["zstd"], "codec": "zstd"}, arrays={b: run.blocks[b] for b in run.blocks},
                             timesteps=run.timesteps, rows=run.rows, chunk_rows=run.chunk_rows, dtype="float16",
                             provenance={})
    assert again.run_id == result.run_id and again.codec == "zstd"


@pytest.mark.parametrize(("args", "message"), [
    (["--codec", "lz4"], "unknown codec 'lz4'; use zstd (lossless), bitround:K or int8"),
    (["--codec", "bitround:10"], "K an integer in 1..9 for float16"),
    (["--codec", "bitround:0"], "K an integer in 1..9 for float16"),
    (["--codec", "bitround"], "K an integer in 1..9 for float16"),
    (["--codec", "bitround:23", "--dtype", "float32"], "K an integer in 1..22 for float32"),
])
def test_a_bad_codec_is_one_line_and_creates_nothing(tmp_path, args, message):
    store = tmp_path / "never.zarr"
    result = CliRunner().invoke(app, ["extract", "--dataset", "demo", "--limit", "8", "--store", str(store), *args])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert message in result.output
    assert not store.exists()


def test_the_largest_k_of_each_dtype_is_accepted():
    assert parse_codec("bitround:9", "float16") == ("bitround", {"keepbits": 9})
    assert parse_codec("bitround:22", "float32") == ("bitround", {"keepbits": 22})


def test_inspect_shows_each_runs_codec(make_run):
    w = make_run(dtype="float16", spec={**SPEC, "codec": "int8"}, done=(0,), failed={}, undone_failed={})
    doc = inspect_store(str(w.path))
    assert [r["codec"] for r in doc["runs"]] == ["int8"]
    text = CliRunner().invoke(app, ["inspect", str(w.path)]).output
    assert " int8  done 4/10" in text
    assert json.loads(CliRunner().invoke(app, ["inspect", str(w.path), "--json"]).output)["runs"][0]["codec"] == "int8"
