"""featurestore: diffusion-model features extracted once into a zarr v3 store, read from Python.

    import featurestore
    store = featurestore.open("demo-output/store.zarr")      # read-only FeatureStore
    run = store.run("2263")                                   # a run id or an unambiguous prefix
    X, y = run.split("train", t=50, block="block2", pool=4)   # float32 (n, C*4*4), int64 (n,)
    df = store.images.to_pandas()                             # the images table, indexed by store row
    da = run.to_xarray(block="block2")                        # lazy DataArray (timestep, image, channel, y, x)

A store opened read-only (the default) hands out objects without writer methods; `open(path,
mode="a")` gives a WritableStore whose runs are WritableRuns. Every feature read refuses, with
one line, what could be wrong: images still pending (IncompleteRunError, unless
`allow_incomplete`), damaged chunks (DamagedChunkError), inf/NaN values (NonFiniteError); all
three are StoreError, itself a ValueError. `FeatureDataset` (torch) is imported on first use,
so `import featurestore` does not import torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from featurestore.store import (
    DamagedChunkError,
    FeatureStore,
    ImagesTable,
    IncompleteRunError,
    NonFiniteError,
    Run,
    RunStatus,
    StoreError,
    WritableRun,
    WritableStore,
    package_version,
)

__version__ = package_version()

__all__ = [
    "ChunkShuffleSampler",
    "DamagedChunkError",
    "FeatureDataset",
    "FeatureStore",
    "ImagesTable",
    "IncompleteRunError",
    "NonFiniteError",
    "Run",
    "RunStatus",
    "StoreError",
    "WritableRun",
    "WritableStore",
    "__version__",
    "open",
]

_TORCH_VIEW = ("FeatureDataset", "ChunkShuffleSampler")  # in featurestore.torch_view, which imports torch


def open(path_or_url: str | Path, mode: str = "r") -> FeatureStore:  # noqa: A001 - featurestore.open, as zarr.open
    """Open the feature store at a local path or fsspec URL.

    mode "r" (the default): a read-only FeatureStore; the store must exist and be complete.
    mode "a": a WritableStore (adds add_images, write_captions, create_run, remove_run; its runs
    are WritableRuns), creating the store when missing. Raises StoreError (one line) for another
    mode, a missing or incomplete store, a path that holds something else, or another format."""
    return FeatureStore.open(path_or_url, mode)


def __getattr__(name: str) -> Any:
    if name in _TORCH_VIEW:
        from featurestore import torch_view

        return getattr(torch_view, name)
    raise AttributeError(f"module 'featurestore' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_TORCH_VIEW})
