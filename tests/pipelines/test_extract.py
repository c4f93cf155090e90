"""Extraction end to end through the CLI on the real MNIST DDPM and the embedded demo digits:
values against a direct computation, determinism, re-runs, resume after kill -9, bad input."""

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image
from extract_helpers import kill_extract_after
from typer.testing import CliRunner

from cli.main import EXIT_SOME_FAILED, app
from data_manifests.builders import DEMO_DIR
from featurestore.store import FeatureStore, StoreError
from pipelines.extract.backbone import create_backbone
from pipelines.extract.noise import image_eps

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def extract(store: Path, *extra: str):
    return cli("extract", "--dataset", "demo", "--store", store, "--json", *extra)


def only_run(store: Path):
    store_ = FeatureStore.open(str(store))
    (run,) = store_.runs()
    return run


def all_arrays(run) -> dict:
    return {(t, b): run.numpy(t, b) for t in run.timesteps for b in run.blocks}


def file_times(root: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_stored_features_equal_a_direct_forward(tmp_path):
    store = tmp_path / "s.zarr"
    result = extract(store, "--limit", "40", "--timesteps", "10,300", "--batch-size", "16", "--chunk-rows", "16")
    assert result.exit_code == 0, result.output
    run = only_run(store)
    assert run.timesteps == [10, 300] and list(run.blocks) == ["block0", "block1", "block2", "block3"]

    demo = np.load(DEMO_DIR / "mnist-demo.npz")
    x0 = torch.from_numpy(demo["images"][:40, None].astype(np.float32) / 255 - 0.5)
    assert np.array_equal(run.labels, demo["labels"][:40])
    backbone = create_backbone("ddpm-mnist")
    model = backbone.module.gt
    for t in (10, 300):
        alpha_bar = backbone.alphas_cumprod()[t]
        eps = torch.stack([image_eps(0, f"mnist-demo.npz#{i}", t, (1, 28, 28)) for i in range(40)])
        h = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
        with torch.no_grad():
            for k in range(4):
                h = model.blocks[k](h)
                stored = run.numpy(t, f"block{k}")
                assert stored.dtype == np.float16 and stored.shape == (40, *h.shape[1:])
                np.testing.assert_array_equal(stored, h.half().numpy())
                if k == 0:
                    h = h + model.embed_time(torch.full((40,), t))[:, :, None, None]


def test_noise_depends_only_on_seed_id_and_t():
    a = image_eps(0, "img-1", 10, (1, 4, 4))
    assert torch.equal(a, image_eps(0, "img-1", 10, (1, 4, 4)))
    for other in (image_eps(1, "img-1", 10, (1, 4, 4)), image_eps(0, "img-2", 10, (1, 4, 4)), image_eps(0, "img-1", 11, (1, 4, 4))):
        assert not torch.equal(a, other)


def test_batch_size_does_not_change_a_single_bit(tmp_path):
    args = ("--limit", "70", "--timesteps", "0,100", "--chunk-rows", "32")
    assert extract(tmp_path / "a.zarr", *args, "--batch-size", "7").exit_code == 0
    assert extract(tmp_path / "b.zarr", *args, "--batch-size", "32").exit_code == 0
    a, b = only_run(tmp_path / "a.zarr"), only_run(tmp_path / "b.zarr")
    assert a.run_id == b.run_id
    for key, values in all_arrays(a).items():
        assert values.tobytes() == b.numpy(*key).tobytes(), key


def test_rerun_writes_nothing_and_a_changed_spec_is_a_new_run(tmp_path):
    store = tmp_path / "s.zarr"
    args = ("--limit", "48", "--timesteps", "10", "--chunk-rows", "16")
    first = json.loads(extract(store, *args).output)
    before = file_times(store)
    time.sleep(0.01)
    again = extract(store, *args, "--batch-size", "5")
    assert again.exit_code == 0
    doc = json.loads(again.output)
    assert doc["run_id"] == first["run_id"] and doc["chunks_written"] == 0 and doc["chunks_skipped"] == 3
    assert file_times(store) == before

    old = only_run(store).numpy(10, "block2")
    changed = json.loads(extract(store, *args, "--seed", "1").output)
    assert changed["run_id"] != first["run_id"]
    s = FeatureStore.open(str(store))
    assert sorted(s.run_ids()) == sorted([first["run_id"], changed["run_id"]])
    assert len(s.images) == 48  # the same images, shared by both runs
    np.testing.assert_array_equal(s.run(first["run_id"]).numpy(10, "block2"), old)
    assert not np.array_equal(s.run(changed["run_id"]).numpy(10, "block2"), old)


def test_resume_after_kill_9_gives_the_uninterrupted_arrays(tmp_path):
    args = ["--dataset", "demo", "--limit", "512", "--timesteps", "50,400", "--chunk-rows", "32", "--batch-size", "16"]
    killed = tmp_path / "killed.zarr"
    kill_extract_after(args, killed, done_chunks=3)

    status = json.loads(cli("inspect", killed, "--json").output)["runs"][0]
    assert 0 < status["done"] < 512 and status["pending"] > 0, status

    resumed = cli("extract", *args, "--store", killed, "--json")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.output)["chunks_skipped"] >= 3

    assert cli("extract", *args, "--store", tmp_path / "clean.zarr", "--json").exit_code == 0
    a, b = only_run(killed), only_run(tmp_path / "clean.zarr")
    assert a.run_id == b.run_id
    for key, values in all_arrays(b).items():
        assert values.tobytes() == a.numpy(*key).tobytes(), key
    status = json.loads(cli("inspect", killed, "--json").output)["runs"][0]
    assert (status["images"], status["done"], status["failed"], status["pending"]) == (512, 512, 0, 0)


def write_image_folder(root: Path, n: int) -> list[str]:
    rng = np.random.default_rng(0)
    sources = []
    for i in range(n):
        cls = f"c{i % 2}"
        (root / cls).mkdir(parents=True, exist_ok=True)
        path = root / cls / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(path)
        sources.append(f"{cls}/img{i}.png")
    return sources


def write_csv(path: Path, sources: list[str]) -> None:
    with open(path, "w", newline="") as f:
        f.write('# classes: ["c0", "c1"]\n')
        w = csv.writer(f)
        w.writerow(["id", "source", "label", "class_name", "split", "domain"])
        for s in sources:
            label = int(s[1])
            w.writerow([s, s, label, f"c{label}", "test", "photo"])


def test_bad_images_are_recorded_and_the_rest_extracted(tmp_path):
    root = tmp_path / "data"
    sources = write_image_folder(root, 10)
    big = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    big.save(root / "c1" / "cut.jpg", quality=95)
    data = (root / "c1" / "cut.jpg").read_bytes()
    (root / "c1" / "cut.jpg").write_bytes(data[: len(data) // 2])
    bad = ["c1/cut.jpg", "c0/gone.png"]
    write_csv(root / "m.csv", sources[:5] + bad + sources[5:])
    write_csv(root / "good.csv", sources)

    store = tmp_path / "s.zarr"
    result = cli("extract", "--manifest", root / "m.csv", "--store", store, "--timesteps", "10")
    assert result.exit_code == EXIT_SOME_FAILED, result.output
    assert "failed: c1/cut.jpg" in result.output and "failed: c0/gone.png" in result.output
    status = json.loads(cli("inspect", store, "--json").output)["runs"][0]
    assert (status["done"], status["failed"], status["pending"]) == (10, 2, 0)
    assert set(status["failed_ids"]) == set(bad)
    assert "FileNotFoundError" in status["failed_ids"]["c0/gone.png"]

    run = only_run(store)
    np.testing.assert_array_equal(run.usable_rows(), [0, 1, 2, 3, 4, 7, 8, 9, 10, 11])  # failed rows are left out
    with pytest.raises(StoreError, match="2 of the 12 rows asked for are failed images"):
        run.numpy(10, "block1")
    values = run.numpy(10, "block1", run.usable_rows())
    # the good rows are exactly what a manifest without the bad rows gives (noise is per image id)
    good_store = tmp_path / "good.zarr"
    assert cli("extract", "--manifest", root / "good.csv", "--store", good_store, "--timesteps", "10").exit_code == 0
    np.testing.assert_array_equal(values, only_run(good_store).numpy(10, "block1"))


def test_retry_failed_extracts_images_whose_files_were_fixed(tmp_path):
    root = tmp_path / "data"
    sources = write_image_folder(root, 10)
    moved = root / "c0" / "img4.png"
    moved.rename(tmp_path / "away.png")
    write_csv(root / "m.csv", sources)
    store = tmp_path / "s.zarr"
    args = ["extract", "--manifest", root / "m.csv", "--store", store, "--timesteps", "10", "--chunk-rows", "4"]
    first = cli(*args)
    assert first.exit_code == EXIT_SOME_FAILED and "the same command with --retry-failed extracts them" in first.output
    (tmp_path / "away.png").rename(moved)  # the file is back
    assert cli(*args).exit_code == EXIT_SOME_FAILED  # a plain re-run does not try it again
    retried = cli(*args, "--retry-failed", "--json")
    assert retried.exit_code == 0, retried.output
    doc = json.loads(retried.stdout)
    assert (doc["done"], doc["failed"], doc["chunks_written"]) == (10, {}, 1)  # only the chunk of img4
    clean = tmp_path / "clean.zarr"
    assert cli(*args[:4], clean, *args[5:]).exit_code == 0
    run, reference = only_run(store), only_run(clean)
    for block in run.blocks:
        assert run.numpy(10, block).tobytes() == reference.numpy(10, block).tobytes(), block


def test_a_wrong_data_root_is_a_clear_error(tmp_path):
    result = cli("extract", "--dataset", "mnist-test", "--data-root", tmp_path, "--store", tmp_path / "s.zarr")
    assert result.exit_code == 1 and "error:" in result.output, result.output
    assert not (tmp_path / "s.zarr").exists()
    root = tmp_path / "data"
    write_csv(root / "m.csv", write_image_folder(root, 3))
    for p in root.rglob("*.png"):
        p.unlink()
    result = cli("extract", "--manifest", root / "m.csv", "--store", tmp_path / "s.zarr")
    assert result.exit_code == 1 and "none of the 3 files" in result.output, result.output


def test_a_malformed_manifest_is_a_clear_error_and_writes_nothing(tmp_path):
    (tmp_path / "m.csv").write_text("id,source,class_name,split,domain\na,a.png,x,test,photo\n")
    store = tmp_path / "s.zarr"
    result = cli("extract", "--manifest", tmp_path / "m.csv", "--store", store)
    assert result.exit_code == 1
    assert result.output.startswith("error:") and "label" in result.output
    assert not store.exists()


@pytest.mark.parametrize("option, message", [
    (["--blocks", "block9"], "no block block9"),
    (["--timesteps", "1001"], "timesteps must be integers in 0..1000"),
    (["--pool", "block7=2"], "--pool names block block7"),
    (["--prompt", "blip"], "unconditional"),
    (["--noise", "fancy"], "--noise 'fancy'"),
    (["--dataset", "nosuch"], "nosuch"),
    (["--device", "tpu"], "not a torch device"),
])
def test_bad_options_are_refused_before_anything_is_written(tmp_path, option, message):
    store = tmp_path / "s.zarr"
    args = ["extract", "--store", store, "--limit", "4"]
    if option[0] != "--dataset":
        args += ["--dataset", "demo"]
    result = cli(*args, *option)
    assert result.exit_code == 1 and message in result.output, result.output
    assert not store.exists()


def test_pooling_and_float32(tmp_path):
    store = tmp_path / "s.zarr"
    result = extract(store, "--limit", "8", "--timesteps", "10", "--pool", "block1=2,block3=7", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    run = only_run(store)
    assert run.blocks == {"block0": [16, 28, 28], "block1": [32, 2, 2], "block2": [32, 28, 28], "block3": [16, 7, 7]}
    unpooled = tmp_path / "u.zarr"
    extract(unpooled, "--limit", "8", "--timesteps", "10", "--dtype", "float32")
    full = only_run(unpooled).numpy(10, "block1")
    np.testing.assert_allclose(run.numpy(10, "block1"), full.reshape(8, 32, 2, 14, 2, 14).mean(axis=(3, 5)), rtol=1e-5, atol=1e-6)
    assert run.numpy(10, "block0").dtype == np.float32


def test_inspect_json_lists_every_array(tmp_path):
    store = tmp_path / "s.zarr"
    extract(store, "--limit", "20", "--timesteps", "10,100", "--blocks", "block0,block2")
    doc = json.loads(cli("inspect", store, "--json").output)
    (run,) = doc["runs"]
    assert run["spec"]["timesteps"] == [10, 100] and run["spec"]["blocks"] == ["block0", "block2"]
    assert run["images"] == run["done"] == 20
    root = zarr.open_group(str(store), mode="r")
    entries = {(a["timestep"], a["block"]): a for a in run["arrays"]}
    assert set(entries) == {(10, "block0"), (10, "block2"), (100, "block0"), (100, "block2")}
    for a in entries.values():
        assert list(root[a["path"]].shape) == a["shape"] == [20, *run["blocks"][a["block"]]]
    assert run["provenance"]["backbone"]["weights_digest"] == run["spec"]["weights_digest"]
    assert run["provenance"]["package_version"]


@pytest.mark.parametrize("option", [["--chunk-rows", "0"], ["--batch-size", "0"]])
def test_zero_chunk_rows_or_batch_size_are_refused_before_anything_is_written(tmp_path, option):
    result = extract(tmp_path / "s.zarr", "--limit", "8", "--timesteps", "10", *option)
    assert result.exit_code == 1 and f"error: {option[0]} must be at least 1" in result.output, result.output
    assert not (tmp_path / "s.zarr").exists()
