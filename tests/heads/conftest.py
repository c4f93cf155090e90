"""Fixtures for tests/heads: synthetic stores whose labels are a known function of the features.

Helpers are handed out as fixtures (`build_run`, `noise`, `lit_channel`, `chunk_reads`): test modules
cannot import this file."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping

import numpy as np
import pytest

from featurestore.store import FeatureStore, Run

Features = Mapping[tuple[int | None, str], np.ndarray]


def write_run(path, features: Features, labels: np.ndarray, splits: list[str] | None = None, *,
              chunk_rows: int = 32, name: str = "diffusion", order: np.ndarray | None = None) -> Run:
    """A run over images img0..imgN-1 (added to the store at `path` if missing; `features` and
    `labels` are per image) with every chunk written. Run row i holds image order[i] (default: i).
    Splits alternate test/train unless given."""
    n = len(labels)
    splits = splits if splits is not None else ["train" if i % 2 else "test" for i in range(n)]
    order = np.arange(n) if order is None else order
    store = FeatureStore.open(str(path), mode="a")
    ids = [f"img{i}" for i in range(n)]
    table_rows = store.add_images("synthetic", {
        "id": ids, "label": labels, "class_name": [f"c{label}" for label in labels], "split": splits,
        "domain": ["x"] * n, "source": ids,
    })
    timesteps = list(dict.fromkeys(t for t, _ in features))
    arrays = {b: x.shape[1:] for (_, b), x in features.items()}
    run = store.create_run({"name": name}, arrays=arrays, timesteps=timesteps, rows=table_rows[order],
                           chunk_rows=chunk_rows, dtype="float32", provenance={})
    for c in range(run.n_chunks):
        s = run.chunk_slice(c)
        rows = order[s]
        run.write_chunk(c, {k: x[rows] for k, x in features.items()}, np.zeros(len(rows), bool), [""] * len(rows))
    return run


@pytest.fixture(scope="session")
def build_run() -> Callable[..., Run]:
    """write_run itself, for module-scoped stores."""
    return write_run


@pytest.fixture
def make_run(tmp_path) -> Callable[..., Run]:
    """write_run into tmp_path/s.zarr (call it again with another `name` for a second run)."""
    return lambda features, labels, splits=None, **kw: write_run(tmp_path / "s.zarr", features, labels, splits, **kw)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def noise() -> Callable[..., np.ndarray]:
    """noise(rng, n, (C, H, W)): standard normal float32 maps."""
    return lambda rng, n, shape: rng.standard_normal((n, *shape)).astype(np.float32)


@pytest.fixture(scope="session")
def lit_channel(noise) -> Callable[..., np.ndarray]:
    """lit_channel(rng, labels, (C, H, W), strength=3): noise maps where class k adds `strength`
    to channel k everywhere."""

    def build(rng: np.random.Generator, labels: np.ndarray, shape: tuple[int, int, int], strength: float = 3.0) -> np.ndarray:
        x = noise(rng, len(labels), shape)
        x[np.arange(len(labels)), labels] += strength
        return x

    return build


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture
def chunk_reads(monkeypatch) -> Counter:
    """From now on, a Counter of the chunks read through `Run.read_chunk` (every feature read goes
    through it, a whole chunk at a time): (run_id, t, block, chunk) -> reads."""
    reads: Counter = Counter()
    original = Run.read_chunk

    def counted(self, t, block, chunk):
        reads[(self.run_id, t, block, chunk)] += 1
        return original(self, t, block, chunk)

    monkeypatch.setattr(Run, "read_chunk", counted)
    return reads
