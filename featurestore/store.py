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
        nonfinite                    (n_chunks, n_arrays, 2) int64: per chunk and (t, block) in the order
                                     of the attribute `nonfinite_keys`, the non-finite values the model
                                     computed (before the cast to the stored dtype) and those stored

A chunk of rows is the unit of work: it is written whole (every array, then the failure columns,
then its done flag), so a killed extraction leaves only complete chunks marked done, and two
writers never share a zarr chunk. Every feature value read goes through `Run.read_chunk`, which
refuses a chunk that is not done, missing, undecodable or holds non-finite values of images that
did not fail. This module knows nothing of torch.
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


class IncompleteRunError(StoreError):
    """Rows of a run that are not extracted yet were asked for (the run is still pending)."""


class NonFiniteError(StoreError):
    """Features that hold inf or NaN (e.g. float16 overflow) were asked for."""


class DamagedChunkError(StoreError):
    """A chunk marked done whose file is missing or cannot be decoded."""


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
                    config={"write_empty_chunks": True},  # a done chunk always has its file (see read_chunk)
                )
        n_chunks = -(-n // chunk_rows)
        keys = [f"{timestep_key(t)}/{b}" for t in timesteps for b in arrays]
        g.create_array("nonfinite", shape=(n_chunks, len(keys), 2), dtype="int64", chunks=(1, len(keys), 2),
                       fill_value=0, overwrite=True)
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
            "nonfinite_keys": keys,
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

    def note(self) -> str:
        """One line for outputs: how many images were used, failed and left pending."""
        parts = [f"{self.done} of {self.images} images used"]
        if self.failed:
            parts.append(f"{self.failed} failed (excluded)")
        if self.pending:
            parts.append(f"{self.pending} pending (run incomplete: --allow-incomplete)")
        return ", ".join(parts)


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
        nonfinite_computed: Mapping[tuple[int | None, str], int] | None = None,
    ) -> dict[tuple[int | None, str], tuple[int, int]]:
        """Write one whole chunk of rows for every array, then mark it done (last, so a kill
        before the mark leaves the chunk to be written again).

        `nonfinite_computed`: per (t, block), the non-finite values the model produced before the
        cast to the stored dtype (None: not counted, taken as the stored count). The stored ones
        are counted here. Returns (computed, stored) per (t, block) with any non-finite value."""
        rows = self.chunk_slice(chunk)
        counts: dict[tuple[int | None, str], tuple[int, int]] = {}
        for (t, block), values in features.items():
            self.array(t, block)[rows] = values
            stored = int(values.size - np.count_nonzero(np.isfinite(values)))
            computed = stored if nonfinite_computed is None else int(nonfinite_computed.get((t, block), 0))
            if stored or computed:
                counts[(t, block)] = (computed, stored)
        if "nonfinite" in self.group:
            keys = self.attrs["nonfinite_keys"]
            table = np.zeros((len(keys), 2), dtype=np.int64)
            for (t, block), pair in counts.items():
                table[keys.index(f"{timestep_key(t)}/{block}")] = pair
            self.group["nonfinite"][chunk] = table
        self.group["failed"][rows] = np.asarray(failed, dtype=np.uint8)
        self.group["error"][rows] = np.asarray(list(errors), dtype=str)
        self.group["done"][chunk] = 1
        return counts

    def nonfinite(self) -> dict[str, dict[str, int]] | None:
        """Per array ("t<T>/<block>"): {"computed", "stored"} non-finite values over the done
        chunks; None for a run written before they were counted."""
        if "nonfinite" not in self.group:
            return None
        totals = (self.group["nonfinite"][:] * self.done_chunks()[:, None, None]).sum(axis=0)
        return {key: {"computed": int(c), "stored": int(s)} for key, (c, s) in zip(self.attrs["nonfinite_keys"], totals)}

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

    def usable_rows(self, allow_incomplete: bool = False) -> np.ndarray:
        """Sorted int64 indices of the rows whose chunk is done and whose image did not fail.

        Raises IncompleteRunError when images are still pending, unless `allow_incomplete`
        (then only the done rows are returned)."""
        done = self.rows_done()
        if not allow_incomplete and not done.all():
            pending = int((~done).sum())
            raise IncompleteRunError(
                f"run {self.run_id} is incomplete: {pending} of {len(self)} images pending; re-run the same "
                f"`featurestore extract` to resume, or pass --allow-incomplete to use the {len(self) - pending} done"
            )
        return np.flatnonzero(done & ~self.failed)

    # -- views ----------------------------------------------------------------------------------
    def read_chunk(self, t: int | None, block: str, chunk: int) -> np.ndarray:
        """All rows of one chunk of (t, block), as stored. The one place feature values are read.

        Raises IncompleteRunError for a chunk not marked done, DamagedChunkError for a done chunk
        whose file is missing or undecodable (`featurestore verify --repair` marks it to redo),
        NonFiniteError for inf/NaN in rows of images that did not fail."""
        arr = self.array(t, block)
        where = f"run {self.run_id} array {timestep_key(t)}/{block} chunk {chunk}"
        if not 0 <= chunk < self.n_chunks:
            raise StoreError(f"{where}: no such chunk (the run has {self.n_chunks})")
        if not self.group["done"][chunk]:
            raise IncompleteRunError(f"{where} is not extracted yet; re-run the same `featurestore extract` to resume")
        rows = self.chunk_slice(chunk)
        failed = self.group["failed"][rows].astype(bool)
        if not _chunk_exists(arr, chunk) and not failed.all():
            raise DamagedChunkError(f"{where} is marked done but its file is missing; "
                                    "run `featurestore verify STORE --repair`, then extract again")
        try:
            values = arr[rows]
        except Exception as exc:  # noqa: BLE001 - any codec or I/O error means the chunk is damaged
            raise DamagedChunkError(f"{where} cannot be decoded ({type(exc).__name__}: {exc}); "
                                    "run `featurestore verify STORE --repair`, then extract again") from None
        if values.dtype.kind == "f":
            bad = ~np.isfinite(values).reshape(len(values), -1).all(axis=1) & ~failed
            if bad.any():
                raise NonFiniteError(
                    f"{where} holds non-finite values (inf/NaN) for {int(bad.sum())} images"
                    f"{' (float16 overflow: values beyond 65504)' if values.dtype == np.float16 else ''}; "
                    "extract again with --dtype float32 (a new run)"
                )
        return values

    def numpy(self, t: int | None, block: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """Features of (t, block) as an (n, C, H, W) array of the stored dtype, for all rows, a
        slice, or row indices (any order). Every row asked for must be done and not failed: pass
        `rows=run.usable_rows()` to skip failed images. Raises StoreError (subclasses as in
        `read_chunk`) otherwise."""
        if rows is None or isinstance(rows, slice):
            index = np.arange(len(self))[rows if rows is not None else slice(None)]
        else:
            index = np.asarray(rows, dtype=np.int64)
        self._check_usable(index)
        arr = self.array(t, block)
        out = np.empty((len(index), *arr.shape[1:]), dtype=arr.dtype)
        chunk_of = index // self.chunk_rows
        for c in np.unique(chunk_of):
            at = np.flatnonzero(chunk_of == c)
            out[at] = self.read_chunk(t, block, int(c))[index[at] - c * self.chunk_rows]
        return out

    def _check_usable(self, index: np.ndarray) -> None:
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise StoreError(f"run {self.run_id} has rows 0..{len(self) - 1}; asked for row {int(index.max())}")
        pending = int((~self.rows_done()[index]).sum())
        if pending:
            raise IncompleteRunError(
                f"run {self.run_id}: {pending} of the {len(index)} rows asked for are pending (not extracted yet); "
                "re-run the same `featurestore extract` to resume, or read rows=run.usable_rows(allow_incomplete=True)"
            )
        failed = int(self.failed[index].sum())
        if failed:
            raise StoreError(f"run {self.run_id}: {failed} of the {len(index)} rows asked for are failed images "
                             "(no features); read rows=run.usable_rows()")

    def dask(self, t: int | None, block: str):
        """Features of (t, block) as a lazy dask array, one block per store chunk, every chunk
        read through `read_chunk` (so the same refusals apply when it is computed). Use
        `array[run.usable_rows()]` to drop failed images."""
        import dask
        import dask.array as da

        arr = self.array(t, block)
        parts = [da.from_delayed(dask.delayed(self.read_chunk)(t, block, c), (self.chunk_len(c), *arr.shape[1:]),
                                 dtype=arr.dtype) for c in range(self.n_chunks)]
        return da.concatenate(parts) if parts else da.zeros((0, *arr.shape[1:]), dtype=arr.dtype)


def _chunk_exists(array: zarr.Array, chunk: int) -> bool:
    """Whether the file (object) of chunk `chunk` along the first axis of `array` exists."""
    from zarr.core.sync import sync

    key = array.metadata.encode_chunk_key((chunk,) + (0,) * (array.ndim - 1))
    return sync(array.store_path.store.exists(f"{array.path}/{key}"))


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
