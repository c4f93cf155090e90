"""The feature store: one zarr v3 group holding an images table and extraction runs.

Layout (every path is a zarr array or group)::

    store.zarr/
      images/{dataset,id,label,class_name,split,domain,source}   one row per image, union of all runs
      captions/<captioner key>/{text,done}   one caption per images row, reused by every run
      runs/<run_id>/                 attrs: spec, blocks, timesteps, provenance, times
        rows                         (N,) int64: row i of every feature array is images row rows[i]
        t<T>/<block>                 (N, C, H, W) features, chunked along N by `chunk_rows`
        done                         (n_chunks,) uint8, one zarr chunk per element: chunk u is complete
        failed, error                (N,) per-image failure flag and message, chunked like the features

A chunk of rows is the unit of work: it is written whole (every array, then the failure columns,
then its done flag), so a killed extraction leaves only complete chunks marked done, and two
writers never share a zarr chunk. This module knows nothing of torch.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs

FORMAT_VERSION = 1
IMAGE_COLUMNS = ("dataset", "id", "label", "class_name", "split", "domain", "source")
_TABLE_CHUNK = 65536


class StoreError(ValueError):
    """A store that cannot be opened or used as asked."""


def package_version() -> str:
    try:
        return version("featurestore")
    except PackageNotFoundError:
        return "unknown"


def run_id_of(spec: Mapping[str, Any]) -> str:
    """Stable id of a run: a digest of its canonical JSON spec (key order does not matter)."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def timestep_key(t: int | None) -> str:
    """Group name of a timestep; experts that ignore t store theirs under `tnone`."""
    return "tnone" if t is None else f"t{int(t)}"


def feature_codec() -> zarr.codecs.ZstdCodec:
    """Plain zstd (zarr's default for v3), chosen with bench/codecs.py on the demo's activations:
    1.81 bytes per float16 value written at ~245 MB/s, where Blosc zstd5+shuffle saves 9% more
    (1.65) but writes at ~68 MB/s -- too slow for a writer that must keep up with an accelerator."""
    return zarr.codecs.ZstdCodec(level=0)


@dataclass(frozen=True)
class ImagesTable:
    """Columns of the store's images table, as numpy arrays of equal length."""

    dataset: np.ndarray
    id: np.ndarray
    label: np.ndarray
    class_name: np.ndarray
    split: np.ndarray
    domain: np.ndarray
    source: np.ndarray

    def __len__(self) -> int:
        return len(self.id)

    def take(self, rows: np.ndarray) -> ImagesTable:
        return ImagesTable(**{c: getattr(self, c)[rows] for c in IMAGE_COLUMNS})


class FeatureStore:
    """A feature store at a local path or fsspec URL."""

    def __init__(self, group: zarr.Group, url: str):
        self.group = group
        self.url = url
        self._images: ImagesTable | None = None  # read once per handle; add_images keeps it current

    @classmethod
    def open(cls, url: str, mode: str = "r") -> FeatureStore:
        """Open a store; mode "a" creates it when missing, "r" requires it to exist."""
        url = str(url).removeprefix("file://")  # a local path: zarr's LocalStore creates folders
        local = Path(url)
        if "://" not in url and local.is_dir() and any(local.iterdir()) and not (local / "zarr.json").exists():
            raise StoreError(f"{url} is a folder with other files in it, not a feature store; use another path")
        try:
            group = zarr.open_group(url, mode="r" if mode == "r" else "a")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            raise StoreError(f"no feature store at {url}") from exc
        except zarr.errors.ContainsArrayError as exc:
            raise StoreError(f"{url} holds a zarr array, not a feature store") from exc
        if mode != "r" and "format_version" not in group.attrs:
            if len(list(group.keys())):
                raise StoreError(f"{url} is a zarr group but not a feature store; use another path")
            group.attrs.update({"format_version": FORMAT_VERSION, "created_by": package_version()})
            _create_images_table(group)
        if group.attrs.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"{url}: store format {group.attrs.get('format_version')!r}, this version reads {FORMAT_VERSION}"
            )
        return cls(group, url)

    # -- images -------------------------------------------------------------------------------
    @property
    def images(self) -> ImagesTable:
        if self._images is None:
            g = self.group["images"]
            self._images = ImagesTable(**{c: _read_column(g[c]) for c in IMAGE_COLUMNS})
        return self._images

    def add_images(self, dataset: str, columns: Mapping[str, Sequence]) -> np.ndarray:
        """Merge a manifest's rows into the images table; returns each row's index in the table.

        Images are keyed by (dataset, id). A known key must carry the same label, class name,
        split, domain and source, otherwise the store refuses the manifest.
        """
        new = {c: np.asarray(columns[c]) for c in IMAGE_COLUMNS if c != "dataset"}
        new["dataset"] = np.full(len(new["id"]), dataset)
        ids, counts = np.unique(new["id"], return_counts=True)
        if (counts > 1).any():
            raise StoreError(f"image ids repeat within dataset {dataset!r}: {', '.join(map(str, ids[counts > 1][:5]))}")
        current = self.images
        index = {(d, i): r for r, (d, i) in enumerate(zip(current.dataset.tolist(), current.id.tolist()))}
        rows = np.empty(len(new["id"]), dtype=np.int64)
        appended: list[int] = []
        for k, image_id in enumerate(new["id"].tolist()):
            row = index.get((dataset, image_id))
            if row is None:
                rows[k] = len(current) + len(appended)
                appended.append(k)
                continue
            for c in ("label", "class_name", "split", "domain", "source"):
                if str(getattr(current, c)[row]) != str(new[c][k]):
                    raise StoreError(
                        f"image {image_id!r} of dataset {dataset!r} is already in the store with "
                        f"{c}={getattr(current, c)[row]!r}, the manifest says {new[c][k]!r}"
                    )
            rows[k] = row
        if appended:
            g = self.group["images"]
            start = len(current)
            for c in IMAGE_COLUMNS:
                g[c].resize((start + len(appended),))
                g[c][start:] = new[c][appended]
            self._images = None
        return rows

    # -- captions -----------------------------------------------------------------------------
    def captions(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(text, done) per images-table row for one captioner; rows never captioned are not done."""
        n = self.group["images"]["id"].shape[0]
        if "captions" not in self.group or key not in self.group["captions"]:
            return np.full(n, "", dtype=str), np.zeros(n, dtype=bool)
        g = self.group["captions"][key]
        text, done = _read_column(g["text"]), g["done"][:].astype(bool)
        pad = n - len(text)  # images added after the last captioning
        return np.concatenate([text, np.full(pad, "", dtype=str)]), np.concatenate([done, np.zeros(pad, bool)])

    def write_captions(self, key: str, rows: np.ndarray, texts: Sequence[str], info: Mapping[str, Any]) -> None:
        """Store captions of images-table rows under the captioner's key, with its provenance."""
        n = self.group["images"]["id"].shape[0]
        g = self.group.require_group("captions").require_group(key)
        if "text" not in g:
            g.create_array("text", shape=(n,), dtype=str, chunks=(_TABLE_CHUNK,))
            g.create_array("done", shape=(n,), dtype="uint8", chunks=(_TABLE_CHUNK,), fill_value=0)
            g.attrs.update({**info, "created": _now()})
        for name in ("text", "done"):
            if g[name].shape[0] < n:
                g[name].resize((n,))
        order = np.argsort(rows)
        rows = np.asarray(rows)[order]
        g["text"].set_coordinate_selection(rows, np.asarray(list(texts), dtype=str)[order])
        g["done"].set_coordinate_selection(rows, np.ones(len(rows), dtype=np.uint8))

    # -- runs ---------------------------------------------------------------------------------
    def run_ids(self) -> list[str]:
        """Runs that were fully created (one killed while being created is rebuilt by create_run)."""
        return [r for r in self._run_groups() if "created" in self.group["runs"][r].attrs]

    def incomplete_run_ids(self) -> list[str]:
        return [r for r in self._run_groups() if "created" not in self.group["runs"][r].attrs]

    def _run_groups(self) -> list[str]:
        return sorted(self.group["runs"].group_keys()) if "runs" in self.group else []

    def run(self, run_id: str) -> Run:
        if run_id in self.incomplete_run_ids():
            raise StoreError(f"run {run_id} was never fully created (killed while starting); extract again to rebuild it")
        if run_id not in self.run_ids():
            raise StoreError(f"no run {run_id!r} in {self.url}; runs: {', '.join(self.run_ids()) or 'none'}")
        return Run(self.group["runs"][run_id], self)

    def runs(self) -> list[Run]:
        return [self.run(r) for r in self.run_ids()]

    def create_run(
        self,
        spec: Mapping[str, Any],
        *,
        arrays: Mapping[str, Sequence[int]],
        timesteps: Sequence[int | None],
        rows: np.ndarray,
        chunk_rows: int,
        dtype: str,
        provenance: Mapping[str, Any],
    ) -> Run:
        """Create the run of `spec`, or return it if it exists (same spec, same id).

        `arrays` gives each block's stored (C, H, W); every (timestep, block) gets an (N, C, H, W)
        array chunked along N by `chunk_rows`.
        """
        run_id = run_id_of(spec)
        runs = self.group.require_group("runs")
        if run_id in runs and "created" in runs[run_id].attrs:
            return Run(runs[run_id], self)
        # A run killed while being created has no "created" attribute (written last): rebuild it.
        g = runs.require_group(run_id)
        n = len(rows)
        g.create_array("rows", shape=(n,), dtype="int64", chunks=(max(n, 1),), overwrite=True)[:] = rows
        for t in timesteps:
            tg = g.require_group(timestep_key(t))
            for block, chw in arrays.items():
                tg.create_array(
                    block, shape=(n, *chw), dtype=dtype, chunks=(chunk_rows, *chw),
                    compressors=feature_codec(), fill_value=0, overwrite=True,
                )
        n_chunks = -(-n // chunk_rows)
        g.create_array("done", shape=(n_chunks,), dtype="uint8", chunks=(1,), fill_value=0, overwrite=True)
        g.create_array("failed", shape=(n,), dtype="uint8", chunks=(chunk_rows,), fill_value=0, overwrite=True)
        g.create_array("error", shape=(n,), dtype=str, chunks=(chunk_rows,), overwrite=True)
        g.attrs.update({
            "run_id": run_id,
            "spec": dict(spec),
            "blocks": {b: list(chw) for b, chw in arrays.items()},
            "timesteps": list(timesteps),
            "chunk_rows": int(chunk_rows),
            "dtype": dtype,
            "provenance": {**provenance, "package_version": package_version()},
            "created": _now(),
            "finished": None,
        })
        return Run(g, self)


@dataclass(frozen=True)
class RunStatus:
    images: int
    done: int
    failed: int
    pending: int
    failed_ids: dict[str, str]


class Run:
    """One extraction run: its spec, block table and arrays."""

    def __init__(self, group: zarr.Group, store: FeatureStore):
        self.group = group
        self.store = store
        attrs = group.attrs.asdict()
        if "created" not in attrs:
            raise StoreError(f"run {group.path} was never fully created; delete it and extract again")
        self.run_id: str = attrs["run_id"]
        self.spec: dict[str, Any] = attrs["spec"]
        self.blocks: dict[str, list[int]] = attrs["blocks"]
        self.timesteps: list[int | None] = attrs["timesteps"]
        self.chunk_rows: int = attrs["chunk_rows"]
        self.provenance: dict[str, Any] = attrs["provenance"]
        self.attrs = attrs

    def __len__(self) -> int:
        return self.group["rows"].shape[0]

    @property
    def n_chunks(self) -> int:
        return self.group["done"].shape[0]

    def chunk_slice(self, chunk: int) -> slice:
        return slice(chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, len(self)))

    def chunk_len(self, chunk: int) -> int:
        s = self.chunk_slice(chunk)
        return s.stop - s.start

    def array_path(self, t: int | None, block: str) -> str:
        return f"runs/{self.run_id}/{timestep_key(t)}/{block}"

    def array(self, t: int | None, block: str) -> zarr.Array:
        if block not in self.blocks:
            raise StoreError(f"run {self.run_id} has no block {block!r}; blocks: {', '.join(self.blocks)}")
        if t not in self.timesteps:
            raise StoreError(f"run {self.run_id} has no timestep {t!r}; timesteps: {self.timesteps}")
        return self.group[timestep_key(t)][block]

    # -- images of this run ---------------------------------------------------------------------
    @property
    def rows(self) -> np.ndarray:
        return self.group["rows"][:]

    @property
    def images(self) -> ImagesTable:
        return self.store.images.take(self.rows)

    @property
    def labels(self) -> np.ndarray:
        return self.images.label.astype(np.int64)

    # -- bookkeeping ----------------------------------------------------------------------------
    def done_chunks(self) -> np.ndarray:
        return self.group["done"][:].astype(bool)

    def rows_done(self) -> np.ndarray:
        """Per row: whether its chunk has been written completely."""
        return np.repeat(self.done_chunks(), self.chunk_rows)[: len(self)]

    @property
    def failed(self) -> np.ndarray:
        return self.group["failed"][:].astype(bool)

    @property
    def errors(self) -> np.ndarray:
        return _read_column(self.group["error"])

    def write_chunk(
        self,
        chunk: int,
        features: Mapping[tuple[int | None, str], np.ndarray],
        failed: np.ndarray,
        errors: Sequence[str],
    ) -> None:
        """Write one whole chunk of rows for every array, then mark it done (last, so a kill
        before the mark leaves the chunk to be written again)."""
        rows = self.chunk_slice(chunk)
        for (t, block), values in features.items():
            self.array(t, block)[rows] = values
        self.group["failed"][rows] = np.asarray(failed, dtype=np.uint8)
        self.group["error"][rows] = np.asarray(list(errors), dtype=str)
        self.group["done"][chunk] = 1

    def status(self) -> RunStatus:
        """Counts of images written, failed and still to do, and the failed ids with their errors."""
        rows_done = self.rows_done()
        failed = self.failed & rows_done
        ids = self.images.id
        errors = self.errors
        return RunStatus(
            images=len(self),
            done=int((rows_done & ~failed).sum()),
            failed=int(failed.sum()),
            pending=int((~rows_done).sum()),
            failed_ids={str(ids[i]): str(errors[i]) for i in np.flatnonzero(failed)},
        )

    def record_session(self, session: Mapping[str, Any]) -> None:
        """Append one extraction session (when, how long per phase) to the run's provenance."""
        sessions = [*self._fresh_attrs().get("sessions", []), {"ended": _now(), **session}]
        self.group.attrs["sessions"] = self.attrs["sessions"] = sessions

    def mark_finished(self) -> None:
        if self._fresh_attrs().get("finished") is None:
            self.group.attrs["finished"] = self.attrs["finished"] = _now()

    def _fresh_attrs(self) -> dict[str, Any]:
        """The attributes as stored now (another handle may have written since this one opened)."""
        return zarr.open_group(self.group.store, path=self.group.path, mode="r").attrs.asdict()

    # -- views ----------------------------------------------------------------------------------
    def numpy(self, t: int | None, block: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """Features of (t, block) as a numpy array (all rows, a slice, or sorted row indices)."""
        arr = self.array(t, block)
        if rows is None:
            return arr[:]
        if isinstance(rows, slice):
            return arr[rows]
        return arr.get_orthogonal_selection((np.asarray(rows),))

    def dask(self, t: int | None, block: str):
        """Features of (t, block) as a lazy dask array, chunked like the store."""
        import dask.array as da

        return da.from_zarr(self.array(t, block))


def _create_images_table(group: zarr.Group) -> None:
    g = group.require_group("images")
    for c in IMAGE_COLUMNS:
        dtype = "int64" if c == "label" else str
        g.create_array(c, shape=(0,), dtype=dtype, chunks=(_TABLE_CHUNK,))


def _read_column(array: zarr.Array) -> np.ndarray:
    """A table column as a plain numpy array (zarr returns strings as StringDType; users expect "U")."""
    values = array[:]
    return np.array(values.tolist(), dtype=str) if values.dtype.kind == "T" else values


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
