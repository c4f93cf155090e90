"""A tiny store with per-pixel targets whose classes and depth are known functions of the stored
maps, written through the store and targets APIs (helpers are fixtures: tests cannot import this)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from featurestore.store import FeatureStore, Run
from featurestore.targets import RowTargets, write_targets

CLASSES = ["background", "ring", "blob"]
S = 8  # input size: masks are S x S


def dense_store(path, n: int = 48, seed: int = 0, *, ids: list[str] | None = None, chunk_rows: int = 16,
                depth: bool = True, eval_crop: str | None = None, draws: int = 1) -> tuple[Run, dict]:
    """A store at `path` with one run (t=0, blocks "fine" (4, S, S) and "coarse" (6, S/2, S/2)) and
    masks (+ depth) targets. Mask pixels are class k where channel k of "fine" is largest (channel 3
    is noise); a few pixels are 255. Depth = 1 + 2 * sigmoid(channel 0). Splits alternate test/train.
    With `draws` = K > 1 the run holds K noise draws: draw 0 is "fine" as above, draw d > 0 has its
    class channels rolled by d (class k lights channel (k + d) % 3) and fresh noise ("fine" is then
    (n, K, 4, S, S), "coarse" (n, K, 6, S/2, S/2)). Returns (run, {"masks", "depth", "fine",
    "coarse", "ids"})."""
    rng = np.random.default_rng(seed)
    ids = ids or [f"img{i}" for i in range(n)]
    masks = rng.integers(0, 3, (n, S, S)).astype(np.uint8)
    fine = rng.normal(0, 0.3, (n, 4, S, S)).astype(np.float32)
    fine[:, :3] += 2.0 * (masks[:, None] == np.arange(3)[None, :, None, None])
    masks[rng.random(masks.shape) < 0.05] = 255
    coarse = rng.normal(0, 1, (n, 6, S // 2, S // 2)).astype(np.float32)
    depth_maps = (1 + 2 / (1 + np.exp(-fine[:, 0]))).astype(np.float32)
    if draws > 1:
        others = [rng.normal(0, 0.3, fine.shape).astype(np.float32) for _ in range(1, draws)]
        for d, other in enumerate(others, 1):
            other[:, :3] += 2.0 * (masks[:, None] == (np.arange(3)[None, :, None, None] - d) % 3)
        fine = np.stack([fine, *others], axis=1)
        coarse = np.stack([coarse, *(rng.normal(0, 1, coarse.shape).astype(np.float32) for _ in others)], axis=1)
    depth_maps[rng.random(depth_maps.shape) < 0.05] = 0
    store = FeatureStore.open(str(path), mode="a")
    splits = ["train" if i % 2 else "test" for i in range(n)]
    rows = store.add_images("toyseg", {"id": ids, "label": [0] * n, "class_name": ["x"] * n, "split": splits,
                                       "domain": ["x"] * n, "source": ids})
    arrays = {"fine": (4, S, S), "coarse": (6, S // 2, S // 2)}
    spec = {"dataset": "toyseg", "name": "dense", **({"noise_draws": draws} if draws > 1 else {})}
    run = store.create_run(spec, arrays=arrays,
                           timesteps=[0], rows=rows, chunk_rows=chunk_rows, dtype="float32",
                           provenance={"backbone": {"input": {"size": S}}})
    for c in range(run.n_chunks):
        s = run.chunk_slice(c)
        run.write_chunk(c, {(0, "fine"): fine[s], (0, "coarse"): coarse[s]}, np.zeros(s.stop - s.start, bool),
                        [""] * (s.stop - s.start))
    info = {"mask": {"classes": CLASSES, "ignore_index": 255}}
    if depth:
        info["depth"] = {"unit": "m", "max_depth": 10.0, "eval_crop": eval_crop}
    geometry = np.array([1.0, 0.0, 1.0, 0.0])
    write_targets(store, "toyseg", rows, resize="crop", size=S, info=info,
                  load=lambda k: RowTargets((S, S), geometry, mask=masks[k], depth=depth_maps[k] if depth else None))
    return FeatureStore.open(str(path)).run(run.run_id), {"masks": masks, "depth": depth_maps, "fine": fine,
                                                          "coarse": coarse, "ids": ids}


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> tuple[str, Run, dict]:
    path = tmp_path_factory.mktemp("dense") / "s.zarr"
    run, data = dense_store(path)
    return str(path), run, data


@pytest.fixture(scope="session")
def build_dense_store() -> Callable[..., tuple[Run, dict]]:
    return dense_store
