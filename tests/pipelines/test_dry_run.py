"""Before extraction: `extract --dry-run` (sizes measured on a warm-up against the real store),
the free-space refusal and its override, resumed runs counting what is left, and colour images
refused for a grey-only backbone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import pipelines.extract.runner as runner
from cli.main import app
from featurestore.store import FeatureStore
from pipelines.extract.backbone import create_backbone
from pipelines.extract.plan import is_colour
from pipelines.report.demo import DEMO_TIMESTEPS

DEMO = ["--dataset", "demo", "--backbone", "ddpm-mnist", "--timesteps", ",".join(map(str, DEMO_TIMESTEPS)),
        "--blocks", "all", "--dtype", "float16"]
SMALL = ["--dataset", "demo", "--backbone", "ddpm-mnist", "--timesteps", "10", "--limit", "16"]


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def file_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def file_times(root: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def low_free_space(monkeypatch, free: int) -> None:
    """Every disk looks as if it had `free` bytes free."""
    real = shutil.disk_usage

    def fake(path):
        usage = real(path)
        return type(usage)(usage.total, usage.total - free, free)

    monkeypatch.setattr(shutil, "disk_usage", fake)


@pytest.fixture(scope="module")
def demo_plan_and_store(tmp_path_factory):
    """The dry run of 48 demo digits with the demo's extract settings (12 warm-up images), then
    the real extraction of the same spec."""
    store = tmp_path_factory.mktemp("dry") / "demo.zarr"
    planned = cli("extract", *DEMO, "--limit", "48", "--warmup-images", "12", "--store", store, "--dry-run", "--json")
    assert planned.exit_code == 0, planned.output
    created_by_dry_run = store.exists() or any(store.parent.iterdir())
    result = cli("extract", *DEMO, "--limit", "48", "--store", store, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(planned.stdout), store, created_by_dry_run


def test_dry_run_estimates_the_demo_store_within_10_percent(demo_plan_and_store):
    plan, store, created_by_dry_run = demo_plan_and_store
    assert not created_by_dry_run
    assert plan["images"] == plan["images_to_extract"] == 48 and plan["warmup"]["images"] == 12
    real = file_bytes(store)
    assert abs(plan["expected_bytes"] - real) <= 0.10 * real, (plan["expected_bytes"], real)

    blocks = create_backbone("ddpm-mnist").blocks
    (run,) = FeatureStore.open(store).runs()
    assert [a["key"] for a in plan["arrays"]] == [f"t{t}/{b}" for t in DEMO_TIMESTEPS for b in blocks]
    for a in plan["arrays"]:
        t, block = a["key"].split("/")
        c, h, w = blocks[block]
        assert a["shape"] == [c, h, w] and a["dtype"] == "float16"
        assert a["raw_bytes_per_image"] == c * h * w * 2
        stored = file_bytes(store / run.array_path(int(t[1:]), block)) - (store / run.array_path(int(t[1:]), block)
                                                                          / "zarr.json").stat().st_size
        assert abs(a["stored_bytes_per_image"] - stored / 48) <= 0.10 * stored / 48, (a, stored / 48)
    assert plan["codecs"][-1]["name"] == "zstd"
    assert plan["expected_seconds"] > 0 and plan["free_bytes"] > 0 and plan["free_space_at"] == str(store.parent)


def test_dry_run_text_names_every_array_and_the_free_space(tmp_path):
    result = cli("extract", *SMALL, "--warmup-images", "4", "--store", tmp_path / "s.zarr", "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for block, chw in create_backbone("ddpm-mnist").blocks.items():
        assert any(line.startswith(f"t10/{block} ") and " x ".join(map(str, chw)) in line for line in lines), block
    assert "expected store size" in result.stdout and "estimate from 4 images" in result.stdout
    assert f"at {tmp_path}: fits" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_a_url_store_has_unknown_free_space(tmp_path):
    result = cli("extract", *SMALL, "--warmup-images", "2", "--store", "memory://dry-run-test/s.zarr",
                 "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["free_bytes"] is None and plan["fits"] is None and "unknown" in plan["free_space_at"]


def test_a_run_that_would_not_fit_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    low_free_space(monkeypatch, 1 << 20)  # 16 images x 4 blocks take about 2.2 MB
    store = tmp_path / "s.zarr"
    result = cli("extract", *SMALL, "--store", store)
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: 16 images would take about 2.") and "1.0 MiB free" in line
    assert "--ignore-free-space" in line and "--pool" in line
    assert list(tmp_path.iterdir()) == []

    forced = cli("extract", *SMALL, "--store", store, "--ignore-free-space", "--json")
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.stdout)["done"] == 16


def test_the_warm_up_runs_only_when_the_raw_size_does_not_fit(tmp_path, monkeypatch):
    warmups = []
    real_plan = runner.plan

    def spy(job):
        warmups.append(job)
        return real_plan(job)

    monkeypatch.setattr(runner, "plan", spy)
    assert cli("extract", *SMALL, "--store", tmp_path / "a.zarr").exit_code == 0
    assert warmups == []  # plenty of room for the raw 16 x 150,528 bytes: nothing measured

    raw = 16 * sum(c * h * w for c, h, w in create_backbone("ddpm-mnist").blocks.values()) * 2
    low_free_space(monkeypatch, int(0.97 * raw))  # less than raw, more than zstd stores (about 0.9 raw)
    result = cli("extract", *SMALL, "--store", tmp_path / "b.zarr", "--json")
    assert result.exit_code == 0, result.output
    assert len(warmups) == 1


def test_a_resumed_run_counts_only_its_remaining_chunks(tmp_path, monkeypatch):
    store = tmp_path / "s.zarr"
    args = [*SMALL[:-1], "32", "--chunk-rows", "16", "--store", store]
    assert cli("extract", *args).exit_code == 0
    low_free_space(monkeypatch, 0)
    again = cli("extract", *args, "--json")  # done: nothing to write, nothing refused
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["chunks_written"] == 0

    before = file_times(store)
    done = cli("extract", *args, "--warmup-images", "4", "--dry-run", "--json")
    assert done.exit_code == 0, done.output
    plan = json.loads(done.stdout)
    assert plan["images_to_extract"] == 0 and plan["expected_seconds"] == 0
    assert plan["expected_bytes_to_write"] == 0
    assert file_times(store) == before  # a dry run on an existing store changes nothing

    (run,) = FeatureStore.open(store, "a").runs()
    chunk1 = sum(f.stat().st_size for t in run.timesteps for b in run.blocks
                 for f in (store / run.array_path(t, b) / "c" / "1").rglob("*") if f.is_file())
    run.redo([1])
    monkeypatch.undo()
    plan = json.loads(cli("extract", *args, "--warmup-images", "8", "--dry-run", "--json").stdout)
    assert plan["images"] == 32 and plan["images_to_extract"] == 16
    assert abs(plan["expected_bytes_to_write"] - chunk1) <= 0.10 * chunk1, (plan["expected_bytes_to_write"], chunk1)


def write_imagenet(root: Path, colour: bool) -> None:
    """A tiny ILSVRC-2012 layout: 2 classes x 3 JPEGs of 64x48 pixels in train/ and val/."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for wnid in ("n01440764", "n01443537"):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for k in range(3):
                pixels = rng.integers(0, 256, (48, 64, 3 if colour else 1), dtype=np.uint8)
                grey = np.repeat(pixels, 3, axis=2) if not colour else pixels
                Image.fromarray(grey).save(folder / f"{wnid}_{k}.JPEG", quality=90)


def test_colour_imagenet_into_the_grey_default_backbone_is_refused(tmp_path):
    root = tmp_path / "ILSVRC2012"
    write_imagenet(root, colour=True)
    store = tmp_path / "s.zarr"
    refused = cli("extract", "--dataset", "imagenet", "--data-root", root, "--timesteps", "10", "--store", store)
    assert refused.exit_code == 1
    (line,) = refused.stderr.strip().splitlines()
    assert "colour images (12 of 12 sampled)" in line and "ddpm-mnist takes 28x28 grey" in line
    assert "--allow-mismatch" in line and not store.exists()
    assert cli("extract", "--dataset", "imagenet", "--data-root", root, "--timesteps", "10", "--store", store,
               "--dry-run").exit_code == 1

    allowed = cli("extract", "--dataset", "imagenet", "--data-root", root, "--timesteps", "10", "--store", store,
                  "--allow-mismatch", "--json")
    assert allowed.exit_code == 0, allowed.output
    assert json.loads(allowed.stdout)["done"] == 12


def test_grey_photos_saved_as_rgb_jpeg_fit_the_grey_backbone(tmp_path):
    root = tmp_path / "ILSVRC2012"
    write_imagenet(root, colour=False)
    result = cli("extract", "--dataset", "imagenet", "--data-root", root, "--timesteps", "10",
                 "--store", tmp_path / "s.zarr", "--json")
    assert result.exit_code == 0, result.output


def test_is_colour_by_the_spread_of_the_channels():
    grey = np.full((8, 8), 100, dtype=np.uint8)
    assert not is_colour(grey)
    rgb = np.stack([grey, grey, grey], axis=2)
    assert not is_colour(rgb)
    rgb[..., 0] += 2  # mean spread 2 levels: still grey (JPEG chroma rounding)
    assert not is_colour(rgb)
    rgb[:4, :, 0] += 4  # half the pixels spread 6, half 2: mean 4 > 2
    assert is_colour(rgb)


def test_dry_run_of_a_manifest_with_targets_and_pairs_warms_up_on_a_subset(tmp_path):
    """The warm-up extracts a spread of rows: their keypoints, and only the pairs whose both images
    are among them (it used to look up the other pairs' images and fail with a KeyError)."""
    rng = np.random.default_rng(0)
    n = 40
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    kps = "inline:[[3.5, 4.5, 1], [20.5, 10.5, 1]]"
    pairs = [[f"{i}.png", f"{i + 1}.png", "digit", "test"] for i in range(n - 1)]
    lines = ['# classes: ["digit"]', '# target_info: {"keypoints": {"decode": null, "names": null}}',
             f"# pairs: {json.dumps(pairs)}", "id,source,label,class_name,split,domain,keypoints"]
    lines += [f'{i}.png,{i}.png,0,digit,test,photo,"{kps}"' for i in range(n)]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    result = cli("extract", "--manifest", tmp_path / "m.csv", "--data-root", tmp_path, "--backbone", "ddpm-mnist",
                 "--timesteps", "10", "--blocks", "block0", "--store", tmp_path / "s.zarr", "--dry-run",
                 "--warmup-images", "8", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images"] == n
    assert not (tmp_path / "s.zarr").exists()  # the warm-up store is not the user's
