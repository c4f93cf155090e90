"""Fixtures for tests/heads: synthetic stores whose labels are a known function of the features."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import pytest

from featurestore.store import FeatureStore, Run


def write_run(path, features: Mapping[tuple[int | None, str], np.ndarray], labels: np.ndarray,
              splits: list[str] | None = None, *, chunk_rows: int = 16, name: str = "diffusion") -> Run:
    """A run over images img0..imgN-1 (added to the store at `path` if missing), holding `features`
    (every (t, block) of the product of its timesteps and blocks), all chunks written and done."""
    n = len(labels)
    splits = splits if splits is not None else ["train" if i % 2 else "test" for i in range(n)]
    store = FeatureStore.open(str(path), mode="a")
    ids = [f"img{i}" for i in range(n)]
    rows = store.add_images("synthetic", {
        "id": ids, "label": labels, "class_name": [f"c{label}" for label in labels], "split": splits,
        "domain": ["x"] * n, "source": ids,
    })
    timesteps = list(dict.fromkeys(t for t, _ in features))
    arrays = {b: x.shape[1:] for (_, b), x in features.items()}
    run = store.create_run({"name": name}, arrays=arrays, timesteps=timesteps, rows=rows,
                           chunk_rows=chunk_rows, dtype="float32", provenance={})
    for c in range(run.n_chunks):
        s = run.chunk_slice(c)
        run.write_chunk(c, {k: x[s] for k, x in features.items()}, np.zeros(s.stop - s.start, bool), [""] * (s.stop - s.start))
    return run


@pytest.fixture
def make_run(tmp_path) -> Callable[..., Run]:
    """write_run into tmp_path/s.zarr (several calls: several runs of one store)."""
    return lambda features, labels, splits=None, **kw: write_run(tmp_path / "s.zarr", features, labels, splits, **kw)


def lit_channel(rng: np.random.Generator, labels: np.ndarray, shape: tuple[int, int, int], strength: float = 3.0) -> np.ndarray:
    """Noise maps (N, C, H, W) where class k adds `strength` to channel k everywhere."""
    x = rng.standard_normal((len(labels), *shape)).astype(np.float32)
    x[np.arange(len(labels)), labels] += strength
    return x


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
