"""The feature store: one zarr v3 group holding an images table and extraction runs.

Layout (every path is a zarr array or group)::

    store.zarr/
      images/{dataset,id,label,class_name,split,domain,source}   one row per image, union of all runs
      captions/<captioner key>/{text,done}   one caption per images row, reused by every run
      runs/<run_id>/                 attrs: spec, blocks, timesteps, provenance, times
        rows                         (N,) int64: row i of every feature array is images row rows[i]
        t<T>/<block>                 (N, C, H, W) features, chunked along N by `chunk_rows`; a run of
                                     K > 1 noise draws (spec "noise_draws") stores (N, K, C, H, W)
        done                         (n_chunks,) uint8, one zarr chunk per element: chunk u is complete
        failed, error                (N,) per-image failure flag and message, chunked like the features
        nonfinite                    (n_chunks, n_arrays, 2) int64: per chunk and (t, block) in the order
                                     of the attribute `nonfinite_keys`, the non-finite values the model
                                     computed (before the cast to the stored dtype) and those stored
      .featurestore-locks/           local stores only (not zarr): the store lock, per-chunk claims

Arrays carry zarr v3 `dimension_names` (stores written before that have none and read the
same): "image" along a run's N rows, "chunk" along its chunks, "store_row" along the images table
and captions, and `feature_dimensions(block, draws)` on feature arrays (with "draw" second in a
run of several noise draws), so xarray.open_zarr opens a run's groups and the images table.

Noise draws. A run extracted with `--noise-draws K` (K > 1) holds K independent noise draws of
every (image, t) along the "draw" axis. Its readers (`read_rows`, `numpy`, `split`, `to_xarray`)
take `draws`: "mean" (the float32 mean over the draws), an int k (draw k only, as stored) or
"all" (every draw: a draw axis after the image axis; `split` gives each draw its own row). On a
run of one draw, "mean" and 0 are the stored values and "all" has a draw axis of length 1.

Reading and writing are separate classes: `FeatureStore.open(url)` (mode "r") gives a read-only
FeatureStore whose runs are `Run`s; mode "a" gives a WritableStore whose runs are `WritableRun`s.

A chunk of rows is the unit of work: it is written whole (every array, then the failure columns,
then its done flag), so a killed extraction leaves only complete chunks marked done, and two
writers never share a zarr chunk. Every feature value read goes through `Run.read_chunk`, which
refuses a chunk that is not done, missing, undecodable or holds non-finite values of images that
did not fail. This module knows nothing of torch.

Store-level changes (images table, captions, run creation, attributes) are made under the store
lock (`StoreLock`) and commit last: the images table's row count (attribute `rows` of `images`)
is written after the rows, a store's `format_version` after everything else, a run's `created`
after its arrays, so a process killed at any point leaves nothing that a reader takes as written.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs
from filelock import FileLock, Timeout

from featurestore.codecs import BitRoundCodec, Int8Codec, parse_codec  # also registers them with zarr for reading
from featurestore.pooling import pooled

FORMAT_VERSION = 1
IMAGE_COLUMNS = ("dataset", "id", "label", "class_name", "split", "domain", "source")
_TABLE_CHUNK = 65536
LOCKS = ".featurestore-locks"  # folder of a local store holding its lock files (zarr skips it, with a warning)
MARKER = ".featurestore-writer"  # object at a URL store's root while a writer changes store-level metadata
LOCK_TIMEOUT_S = 600.0  # longest wait for another process's store-level change
MARKER_WAIT_S = 30.0  # longest wait for another writer's marker at a URL before refusing
# Spec keys added after runs were first written, with the value every run had before the key
# existed: an older run whose spec lacks them is the same run as a new spec with these values.
SPEC_DEFAULTS: dict[str, Any] = {"ddim": None, "captions": None, "autocast": "none", "codec": "zstd", "ensemble": 1,
                                 "noise_draws": 1}
DRAW_CHOICES = ("mean", "all")  # besides an int k (one draw): see `select_draws`
_REPAIR_HINT = "run `featurestore verify STORE --repair`, then extract again"
_REMOVE_HINT = "`featurestore verify STORE --repair` removes the run; extract again to rebuild it"
CHECKOUT = Path(__file__).resolve().parent.parent  # the git checkout this package runs from, if it is one
GIT_TIMEOUT_S = 2.0


class StoreError(ValueError):
    """A store that cannot be opened or used as asked."""


class IncompleteRunError(StoreError):
    """Rows of a run that are not extracted yet were asked for (the run is still pending)."""


class NonFiniteError(StoreError):
    """Features that hold inf or NaN (e.g. float16 overflow) were asked for."""


class DamagedChunkError(StoreError):
    """A chunk marked done whose file is missing or cannot be decoded; `problem` says which."""

    problem: str = ""


def package_version() -> str:
    try:
        return version("featurestore")
    except PackageNotFoundError:
        return "unknown"


def git_commit(checkout: Path = CHECKOUT) -> tuple[str, bool] | None:
    """(short commit, whether tracked files differ from it) of the git checkout at `checkout`;
    None when it is not a checkout, git is missing or slow, or git fails."""
    if not (checkout / ".git").exists():  # not the package's folder inside some other repository
        return None

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=checkout, capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S, check=True).stdout

    try:
        return git("rev-parse", "--short", "HEAD").strip(), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None


def version_text() -> str:
    """`featurestore <version>`, plus ` (git <short commit>[, modified])` when run from a checkout."""
    commit = git_commit()
    if commit is None:
        return f"featurestore {package_version()}"
    short, modified = commit
    return f"featurestore {package_version()} (git {short}{', modified' if modified else ''})"


def _git_provenance() -> dict[str, Any]:
    """`git_commit` and `git_modified` of the checkout the package runs from; nothing when unknown."""
    commit = git_commit()
    return {} if commit is None else {"git_commit": commit[0], "git_modified": commit[1]}


def run_id_of(spec: Mapping[str, Any]) -> str:
    """Stable id of a run: a digest of its canonical JSON spec (key order does not matter)."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def same_spec(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two specs describe the same run once keys added since (SPEC_DEFAULTS) are filled in."""
    return run_id_of({**SPEC_DEFAULTS, **a}) == run_id_of({**SPEC_DEFAULTS, **b})


def feature_dimensions(block: str, draws: int = 1) -> tuple[str, ...]:
    """zarr `dimension_names` of a feature array of `block`: ("image", "<block>_channel",
    "<block>_y", "<block>_x"), with "draw" after "image" in a run of `draws` > 1 noise draws.
    "image" (the run row) and "draw" are shared by every array of a run; the others carry the
    block's name because blocks differ in C, H and W, and xarray refuses one dimension name with
    two sizes in one group."""
    return ("image", *(("draw",) if draws > 1 else ()), f"{block}_channel", f"{block}_y", f"{block}_x")


def parse_draws(text: str | int) -> str | int:
    """A `--draws` value: "mean", "all" or a draw index k >= 0 (an int or its digits). ValueError
    otherwise."""
    if isinstance(text, int) and text >= 0 or str(text).isdigit():
        return int(text)
    if text not in DRAW_CHOICES:
        raise ValueError(f"--draws takes mean, all or a draw index k (0, 1, ...), not {text!r}")
    return text


def select_draws(values: np.ndarray, stored_draws: int, draws: str | int) -> np.ndarray:
    """Rows of a feature array as `draws` asks, from `values` as stored: (n, C, H, W) for a run of
    one draw, (n, K, C, H, W) for K = `stored_draws` > 1.

    "mean": (n, C, H, W), for K > 1 the float32 mean over the draws (summed in draw order, then
    divided by K: the arithmetic of `extract --ensemble K`); for one draw the values as stored.
    k: (n, C, H, W) draw k as stored. "all": (n, K, C, H, W) as stored (K = 1: a draw axis of one).
    Raises StoreError for a k outside 0..K-1, ValueError for another value."""
    draws = parse_draws(draws)
    if isinstance(draws, int):
        if draws >= stored_draws:
            raise StoreError(f"draw {draws} asked for, but the run holds {stored_draws} noise draw"
                             f"{'s' if stored_draws > 1 else ''} (0..{stored_draws - 1})")
        return values[:, draws] if stored_draws > 1 else values
    if draws == "all":
        return values if stored_draws > 1 else values[:, None]
    if stored_draws == 1:
        return values
    total = values[:, 0].astype(np.float32)
    for d in range(1, stored_draws):
        total += values[:, d]
    return total / np.float32(stored_draws)


def timestep_key(t: int | None) -> str:
    """Group name of a timestep; experts that ignore t store theirs under `tnone`."""
    return "tnone" if t is None else f"t{int(t)}"


def feature_codec(codec: str, dtype: str) -> dict[str, Any]:
    """The zarr codecs of a feature array stored with `codec` (a run spec's "codec"), as keyword
    arguments of `create_array`: `zstd` (lossless, the default), `bitround:K` (K mantissa bits
    kept, then zstd) or `int8` (8-bit codes per chunk and channel, then zstd); the lossy ones are
    in featurestore/codecs.py. Raises ValueError (one line) for another name or a K out of range
    for `dtype`.

    Plain zstd (zarr's default for v3) was chosen with bench/codecs.py on the demo's activations:
    1.81 bytes per float16 value written at ~245 MB/s, where Blosc zstd5+shuffle saves 9% more
    (1.65) but writes at ~68 MB/s -- too slow for a writer that must keep up with an accelerator."""
    kind, params = parse_codec(codec, dtype)
    zstd = zarr.codecs.ZstdCodec(level=0)
    if kind == "bitround":
        return {"filters": [BitRoundCodec(**params)], "compressors": zstd}
    if kind == "int8":
        return {"serializer": Int8Codec(), "compressors": zstd}
    return {"compressors": zstd}


@dataclass(frozen=True, repr=False)
class ImagesTable:
    """Rows of the store's images table (all of them: `store.images`; a run's, in run-row order:
    `run.images`). Each column is a numpy array of one value per row: `label` int64, the others
    str ("U"). `store_row` (int64) is each row's index in the store's images table (the values
    of `run.rows` for a run's table)."""

    dataset: np.ndarray
    id: np.ndarray
    label: np.ndarray
    class_name: np.ndarray
    split: np.ndarray
    domain: np.ndarray
    source: np.ndarray
    store_row: np.ndarray | None = None  # None: rows 0..n-1 of the store's table

    def __post_init__(self) -> None:
        if self.store_row is None:
            object.__setattr__(self, "store_row", np.arange(len(self.id), dtype=np.int64))

    def __len__(self) -> int:
        return len(self.id)

    def take(self, rows: np.ndarray) -> ImagesTable:
        """The rows at positions `rows` (int indices or a boolean mask), in that order."""
        return ImagesTable(**{c: getattr(self, c)[rows] for c in (*IMAGE_COLUMNS, "store_row")})

    def to_pandas(self):
        """A pandas DataFrame with the columns of IMAGE_COLUMNS (label int64, the others str),
        indexed by `store_row`."""
        import pandas as pd

        index = pd.Index(self.store_row, name="store_row")
        return pd.DataFrame({c: getattr(self, c) for c in IMAGE_COLUMNS}, index=index)

    def __repr__(self) -> str:
        classes = dict(zip(self.label.tolist(), self.class_name.tolist()))
        names = [classes[k] for k in sorted(classes)]
        return (f"ImagesTable: {len(self):,} rows; datasets: {_counts(self.dataset)}; splits: {_counts(self.split)}; "
                f"domains: {_counts(self.domain)}; {len(names):,} classes: {_listed(names)}")


class StoreLock:
    """Serialises changes of store-level metadata across processes; re-entrant within a process.

    Local stores: an OS file lock, `<store>/.featurestore-locks/store.lock`, which the OS releases
    when its process dies (kill -9 included). Stores at fsspec URLs have no cross-process lock:
    each change writes a marker object, `<url>/.featurestore-writer`, and deletes it after; a
    writer that finds another's marker waits up to MARKER_WAIT_S seconds, then refuses. Raises
    StoreError when the wait runs out."""

    def __init__(self, url: str):
        self.url = url
        self._local = "://" not in url
        self._file = FileLock(str(Path(url) / LOCKS / "store.lock"), thread_local=False) if self._local else None
        self._threads = threading.RLock()
        self._depth = 0

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._threads:
            self._depth += 1
            try:
                if self._depth > 1:
                    yield
                else:
                    with self._acquire():
                        yield
            finally:
                self._depth -= 1

    @contextmanager
    def _acquire(self) -> Iterator[None]:
        if self._local:
            try:
                self._file.acquire(timeout=LOCK_TIMEOUT_S)
            except Timeout:
                raise StoreError(f"{self.url}: waited {LOCK_TIMEOUT_S:.0f} s for another process that is changing "
                                 f"this store (lock {self._file.lock_file}); try again when it has finished") from None
            try:
                yield
            finally:
                self._file.release()
            return
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.url)
        marker = f"{root.rstrip('/')}/{MARKER}"
        deadline = time.monotonic() + MARKER_WAIT_S
        while fs.exists(marker):
            if time.monotonic() > deadline:
                raise StoreError(
                    f"{self.url}: another writer is changing this store ({_read_text(fs, marker)}); a store at a URL "
                    f"takes one writer at a time. If none is running (a writer killed mid-change), delete "
                    f"{self.url.rstrip('/')}/{MARKER}"
                )
            time.sleep(0.1)
        fs.pipe_file(marker, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": _now()}).encode())
        try:
            yield
        finally:
            fs.rm_file(marker)


class FeatureStore:
    """A feature store at a local path or fsspec URL, opened for reading: its images table
    (`images`), captions and runs (`run`, `runs`, as read-only `Run`s). It has no method that
    changes the store; `FeatureStore.open(url, "a")` gives a `WritableStore`, which has them."""

    def __init__(self, group: zarr.Group, url: str):
        self.group = group
        self.url = url
        self._images: ImagesTable | None = None  # re-read when the committed row count changes

    @classmethod
    def open(cls, url: str | Path, mode: str = "r") -> FeatureStore:
        """Open the store at a local path or fsspec URL. Mode "r" (the default) requires a
        complete store and returns a read-only FeatureStore; mode "a" returns a WritableStore,
        creating the store when missing and completing one whose creation was interrupted.
        Raises StoreError (one line) for another mode, a missing or incomplete store (mode "r"),
        a path holding something else, or another store format."""
        if mode not in ("r", "a"):
            raise StoreError(f"mode {mode!r}: a store opens with mode 'r' (read-only) or 'a' (read and write, "
                             "created when missing); nothing overwrites a store")
        url = str(url).removeprefix("file://")  # a local path: zarr's LocalStore creates folders
        local = Path(url)
        if ("://" not in url and local.is_dir() and not (local / "zarr.json").exists()
                and any(p.name != LOCKS for p in local.iterdir())):
            raise StoreError(f"{url} is a folder with other files in it, not a feature store; use another path")
        group = _open_root(url, "r" if mode == "r" else "r+")
        if mode != "r" and (group is None or not _is_complete(group, url)):
            if group is not None:
                _refuse_foreign(group, url)  # before the lock, which would add a folder to it
            with StoreLock(url).held():
                group = _create(url)
        if group is None:
            raise StoreError(f"no feature store at {url}")
        _check_complete(group, url)
        return FeatureStore(group, url) if mode == "r" else WritableStore(group, url)

    # -- images -------------------------------------------------------------------------------
    @property
    def images(self) -> ImagesTable:
        """The committed rows of the images table (rows a killed append left beyond them are not)."""
        g = _node(self.group, "images", self.url)
        n = _committed_rows(g)
        if self._images is None or len(self._images) != n:
            self._images = ImagesTable(**{c: _read_column(g[c], n) for c in IMAGE_COLUMNS})
        return self._images

    # -- captions -----------------------------------------------------------------------------
    def captions(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(text, done) per images-table row for one captioner; rows never captioned are not done."""
        n = len(self.images)
        captions = _node(self.group, "captions", self.url, missing_ok=True)
        g = None if captions is None else _node(captions, key, self.url, missing_ok=True)
        if g is None or "created" not in g.attrs:
            return np.full(n, "", dtype=str), np.zeros(n, dtype=bool)
        text, done = _read_column(g["text"], n), g["done"][:n].astype(bool)
        pad = n - len(text)  # images added after the last captioning
        return np.concatenate([text, np.full(pad, "", dtype=str)]), np.concatenate([done, np.zeros(pad, bool)])

    # -- runs ---------------------------------------------------------------------------------
    def run_ids(self) -> list[str]:
        """Runs that were fully created (one killed while being created is rebuilt by create_run)."""
        return [r for r, g in self._run_groups().items() if isinstance(g, zarr.Group) and "created" in g.attrs]

    def incomplete_run_ids(self) -> list[str]:
        return [r for r, g in self._run_groups().items() if isinstance(g, zarr.Group) and "created" not in g.attrs]

    def broken_runs(self) -> dict[str, str]:
        """Runs whose group metadata cannot be read: run id -> the error, naming the file."""
        return {r: str(g) for r, g in self._run_groups().items() if isinstance(g, StoreError)}

    def _run_groups(self) -> dict[str, zarr.Group | StoreError]:
        """Every folder under runs/: its group, or the StoreError its metadata gives (one broken
        run does not hide the others)."""
        runs = _node(self.group, "runs", self.url, missing_ok=True)
        out: dict[str, zarr.Group | StoreError] = {}
        for name in [] if runs is None else _child_names(runs):
            try:
                out[name] = _node(runs, name, self.url, hint=_REMOVE_HINT)
            except StoreError as exc:
                out[name] = exc
        return out

    def match_run_id(self, text: str) -> str:
        """The id of the run folder named `text`, or else of the one whose id starts with `text`
        (`--run 2263` for 226351d6d118426f); `text` itself when none does. Raises StoreError
        listing the matches when `text` is the start of several run ids, and for an empty `text`."""
        if not text.strip():
            raise StoreError(f"an empty run id names no run; the runs of {self.url} are listed by `featurestore inspect`")
        runs = _node(self.group, "runs", self.url, missing_ok=True)
        names = [] if runs is None else _child_names(runs)
        if text in names:
            return text
        matches = [name for name in names if name.startswith(text)]
        if len(matches) > 1:
            raise StoreError(f"run id prefix {text!r} matches {len(matches)} runs in {self.url}: {', '.join(matches)}")
        return matches[0] if matches else text

    def run(self, run_id: str) -> Run:
        """The created run `run_id`, or the one run whose id starts with `run_id` (see
        match_run_id). Raises StoreError when it is missing, ambiguous, was never fully created,
        or its metadata is corrupt."""
        runs = _node(self.group, "runs", self.url, missing_ok=True)
        group = None if runs is None or not run_id.strip() else _node(runs, run_id, self.url, missing_ok=True,
                                                                       hint=_REMOVE_HINT)
        if group is None and runs is not None:  # a prefix (listing the runs only then); an empty one is refused
            run_id = self.match_run_id(run_id)
            group = _node(runs, run_id, self.url, missing_ok=True, hint=_REMOVE_HINT)
        if group is None:
            raise StoreError(f"no run {run_id!r} in {self.url}; runs: {', '.join(self.run_ids()) or 'none'}")
        if "created" not in group.attrs:
            raise StoreError(f"run {run_id} was never fully created (killed while starting); extract again to rebuild it")
        return self._run(group)

    def _run(self, group: zarr.Group) -> Run:
        return Run(group, self)

    def runs(self) -> list[Run]:
        """Every fully created run (`run_ids`), opened; StoreError as `run` for a corrupt one."""
        return [self.run(r) for r in self.run_ids()]

    def __repr__(self) -> str:
        kind = "writable" if isinstance(self, WritableStore) else "read-only"
        runs = self.run_ids()
        lines = [f"{type(self).__name__}({self.url!r}, {kind}): "
                 f"{_committed_rows(_node(self.group, 'images', self.url)):,} images, "
                 f"{len(runs)} run{'' if len(runs) == 1 else 's'}"]
        for run_id in runs:
            try:
                run = self.run(run_id)
            except StoreError as exc:
                lines.append(f"  {run_id}  unreadable: {exc}")
                continue
            lines.append(f"  {run_id}  {run.spec.get('backbone', '?')}  {run.spec.get('dataset', '?')}  "
                         f"t={','.join(timestep_text(t) for t in run.timesteps)}  blocks={','.join(run.blocks)}  "
                         f"{run.status_text()}")
        lines += [f"  {run_id}  broken: {why}" for run_id, why in self.broken_runs().items()]
        lines += [f"  {run_id}  never fully created" for run_id in self.incomplete_run_ids()]
        return "\n".join(lines)

class WritableStore(FeatureStore):
    """A feature store opened for writing (`FeatureStore.open(url, "a")`): the reads of
    FeatureStore, runs as `WritableRun`s, and the store-level changes (images table, captions,
    runs), each made under the store lock (`lock`)."""

    def __init__(self, group: zarr.Group, url: str):
        super().__init__(group, url)
        self.lock = StoreLock(url)

    def run(self, run_id: str) -> WritableRun:
        """As FeatureStore.run, as a WritableRun."""
        return super().run(run_id)  # type: ignore[return-value]

    def runs(self) -> list[WritableRun]:
        """As FeatureStore.runs, as WritableRuns."""
        return super().runs()  # type: ignore[return-value]

    def _run(self, group: zarr.Group) -> WritableRun:
        return WritableRun(group, self)

    def add_images(self, dataset: str, columns: Mapping[str, Sequence]) -> np.ndarray:
        """Merge a manifest's rows into the images table; returns each row's index in the table.

        Images are keyed by (dataset, id). A known key must carry the same label, class name,
        split, domain and source, otherwise the store refuses the manifest. New rows are written
        under the store lock, and the new row count is committed last.
        """
        new = {c: np.asarray(columns[c]) for c in IMAGE_COLUMNS if c != "dataset"}
        new["dataset"] = np.full(len(new["id"]), dataset)
        ids, counts = np.unique(new["id"], return_counts=True)
        if (counts > 1).any():
            raise StoreError(f"image ids repeat within dataset {dataset!r}: {', '.join(map(str, ids[counts > 1][:5]))}")
        with self.lock.held():
            current = self.images  # as committed now: another process may have appended since
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
                g = _node(self.group, "images", self.url)
                start, stop = len(current), len(current) + len(appended)
                for c in IMAGE_COLUMNS:
                    g[c].resize((stop,))  # also drops rows a killed append left beyond `start`
                    g[c][start:] = new[c][appended]
                g.attrs["rows"] = stop  # the commit
        return rows

    def write_captions(self, key: str, rows: np.ndarray, texts: Sequence[str], info: Mapping[str, Any]) -> None:
        """Store captions of images-table rows under the captioner's key, with its provenance
        (under the store lock: captions of several processes share zarr chunks)."""
        with self.lock.held():
            n = len(self.images)
            g = self.group.require_group("captions").require_group(key)
            if "created" not in g.attrs:  # new, or killed before its attributes: (re)create
                g.create_array("text", shape=(n,), dtype=str, chunks=(_TABLE_CHUNK,), dimension_names=("store_row",),
                               overwrite=True)
                g.create_array("done", shape=(n,), dtype="uint8", chunks=(_TABLE_CHUNK,),
                               dimension_names=("store_row",), fill_value=0, overwrite=True)
                g.attrs.update({**info, "created": _now()})
            for name in ("text", "done"):
                if g[name].shape[0] < n:
                    g[name].resize((n,))
            order = np.argsort(rows)
            rows = np.asarray(rows)[order]
            g["text"].set_coordinate_selection(rows, np.asarray(list(texts), dtype=str)[order])
            g["done"].set_coordinate_selection(rows, np.ones(len(rows), dtype=np.uint8))

    def remove_run(self, run_id: str) -> None:
        """Delete the folder of run `run_id` (under the store lock), readable or not: a broken run
        cannot be repaired chunk by chunk, and extracting its spec again rebuilds it."""
        from zarr.core.sync import sync

        with self.lock.held():
            sync(self.group.store.delete_dir(f"{self.group.path}/runs/{run_id}".lstrip("/")))

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
        """Create the run of `spec`, or return it if it exists: the same spec, also when the run
        was written before keys of SPEC_DEFAULTS existed (it keeps its id). Under the store lock.

        `arrays` gives each block's stored (C, H, W); every (timestep, block) gets an (N, C, H, W)
        array, (N, K, C, H, W) for K = spec "noise_draws" > 1, chunked along N by `chunk_rows`, stored with the spec's "codec" (`feature_codec`; a
        bad one raises ValueError before anything is written). Raises StoreError when the run's
        group exists with corrupt metadata (it is not overwritten).
        """
        run_id = run_id_of(spec)
        codec = feature_codec({**SPEC_DEFAULTS, **spec}["codec"], dtype)  # a bad name is refused before any write
        draws = {**SPEC_DEFAULTS, **spec}["noise_draws"]
        per_row = (draws,) if draws > 1 else ()
        with self.lock.held():
            groups = self._run_groups()
            if isinstance(groups.get(run_id), StoreError):
                raise groups[run_id]
            for g in [groups.get(run_id), *groups.values()]:
                if isinstance(g, zarr.Group) and "created" in g.attrs and same_spec(g.attrs["spec"], spec):
                    run = WritableRun(g, self)
                    for name in run.chunk_arrays():
                        run._get(name)  # corrupt metadata of an array: StoreError naming the file
                    return run
            # A run killed while being created has no "created" attribute (written last): rebuild it.
            g = self.group.require_group("runs").require_group(run_id)
            n = len(rows)
            g.create_array("rows", shape=(n,), dtype="int64", chunks=(max(n, 1),), dimension_names=("image",),
                           overwrite=True)[:] = rows
            for t in timesteps:
                tg = g.require_group(timestep_key(t))
                for block, chw in arrays.items():
                    tg.create_array(block, shape=(n, *per_row, *chw), dtype=dtype, chunks=(chunk_rows, *per_row, *chw),
                                    dimension_names=feature_dimensions(block, draws),
                                    **codec, fill_value=0, overwrite=True)
            n_chunks = -(-n // chunk_rows)
            keys = [f"{timestep_key(t)}/{b}" for t in timesteps for b in arrays]
            g.create_array("nonfinite", shape=(n_chunks, len(keys), 2), dtype="int64", chunks=(1, len(keys), 2),
                           dimension_names=("chunk", "nonfinite_key", "nonfinite_kind"), fill_value=0, overwrite=True)
            g.create_array("done", shape=(n_chunks,), dtype="uint8", chunks=(1,), dimension_names=("chunk",),
                           fill_value=0, overwrite=True)
            g.create_array("failed", shape=(n,), dtype="uint8", chunks=(chunk_rows,), dimension_names=("image",),
                           fill_value=0, overwrite=True)
            g.create_array("error", shape=(n,), dtype=str, chunks=(chunk_rows,), dimension_names=("image",),
                           overwrite=True)
            g.attrs.update({
                "run_id": run_id,
                "spec": dict(spec),
                "blocks": {b: list(chw) for b, chw in arrays.items()},
                "timesteps": list(timesteps),
                "chunk_rows": int(chunk_rows),
                "dtype": dtype,
                "nonfinite_keys": keys,
                "every_chunk_stored": True,  # write_chunk stores every per-chunk array's file, even all-zero ones
                "provenance": {**provenance, "package_version": package_version(), **_git_provenance()},
                "created": _now(),
                "finished": None,
            })
            return WritableRun(g, self)


@dataclass(frozen=True)
class RunStatus:
    """Image counts of a run (`Run.status`): `done` (extracted, not failed), `failed`, `pending`
    (chunk not extracted yet), and the failed image ids with their error messages."""

    images: int
    done: int
    failed: int
    pending: int
    failed_ids: dict[str, str]


class Run:
    """One extraction run, read-only: its spec, block table and arrays.

    A run has N rows (`len(run)`); run row i is images-table row `run.rows[i]`. Each (t, block)
    is an (N, C, H, W) array of the stored dtype (`blocks[block]` gives (C, H, W); `t` is None for
    experts that ignore it). Features are read with `numpy`, `dask`, `split` and `to_xarray` (and
    `featurestore.FeatureDataset` for torch); every read goes through `read_chunk`, which raises
    IncompleteRunError (chunk not extracted yet), DamagedChunkError or NonFiniteError (all
    StoreError). Rows of images that failed hold no features and are never returned; a run with
    images still pending is refused unless `allow_incomplete` (then only its done rows are used).
    Writing is for `WritableRun`."""

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
        self.codec: str = {**SPEC_DEFAULTS, **self.spec}["codec"]  # how the features are stored (feature_codec)
        self.noise_draws: int = {**SPEC_DEFAULTS, **self.spec}["noise_draws"]  # draws per (image, t) along "draw"
        self.attrs = attrs
        self._arrays: dict[str, zarr.Array] = {}  # opened once per handle: a run's array metadata never changes

    @property
    def feature_blocks(self) -> list[str]:
        """The run's block names in stored order without its `<block>.attn` cross-attention maps
        (extract --attention-maps): the feature maps an analysis scores when no block is named."""
        return [b for b in self.blocks if not b.endswith(".attn")]

    def _get(self, path: str) -> zarr.Array:
        """The run's array at `path`; StoreError naming its zarr.json when that cannot be read."""
        if path not in self._arrays:
            self._arrays[path] = _node(self.group, path, self.store.url, hint=_REPAIR_HINT)
        return self._arrays[path]

    def __len__(self) -> int:
        return self._get("rows").shape[0]

    @property
    def n_chunks(self) -> int:
        return self._get("done").shape[0]

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
            raise StoreError(f"run {self.run_id} has no timestep {timestep_text(t)}; timesteps: "
                             f"{', '.join(timestep_text(x) for x in self.timesteps)}")
        return self._get(f"{timestep_key(t)}/{block}")

    def chunk_arrays(self) -> list[str]:
        """Names of the arrays written per chunk: every "t<T>/<block>", "failed", "error" and
        (runs that count them) "nonfinite"."""
        features = [f"{timestep_key(t)}/{b}" for t in self.timesteps for b in self.blocks]
        return [*features, "failed", "error", *(["nonfinite"] if "nonfinite_keys" in self.attrs else [])]

    # -- images of this run ---------------------------------------------------------------------
    @property
    def rows(self) -> np.ndarray:
        return self._get("rows")[:]

    @property
    def images(self) -> ImagesTable:
        return self.store.images.take(self.rows)

    @property
    def labels(self) -> np.ndarray:
        return self.images.label.astype(np.int64)

    # -- bookkeeping ----------------------------------------------------------------------------
    def done_chunks(self) -> np.ndarray:
        return self._get("done")[:].astype(bool)

    def chunk_done(self, chunk: int) -> bool:
        return bool(self._get("done")[chunk])

    def rows_done(self) -> np.ndarray:
        """Per row: whether its chunk has been written completely."""
        return np.repeat(self.done_chunks(), self.chunk_rows)[: len(self)]

    @property
    def failed(self) -> np.ndarray:
        return self._get("failed")[:].astype(bool)

    @property
    def errors(self) -> np.ndarray:
        return _read_column(self._get("error"))

    def nonfinite(self) -> dict[str, dict[str, int]] | None:
        """Per array ("t<T>/<block>"): {"computed", "stored"} non-finite values over the done
        chunks; None for a run written before they were counted."""
        if "nonfinite_keys" not in self.attrs:
            return None
        totals = (self._get("nonfinite")[:] * self.done_chunks()[:, None, None]).sum(axis=0)
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

    def usable_rows(self, allow_incomplete: bool = False) -> np.ndarray:
        """Sorted int64 indices of the rows whose chunk is done and whose image did not fail.

        Raises IncompleteRunError when images are still pending, unless `allow_incomplete`
        (then only the done rows are returned)."""
        done = self.rows_done()
        if not allow_incomplete and not done.all():
            pending = int((~done).sum())
            partial = f", or pass --allow-incomplete to use the {len(self) - pending} done" if pending < len(self) else ""
            raise IncompleteRunError(
                f"run {self.run_id} is incomplete: {pending} of {len(self)} images pending; re-run the same "
                f"`featurestore extract` to resume{partial}"
            )
        return np.flatnonzero(done & ~self.failed)

    # -- views ----------------------------------------------------------------------------------
    def read_chunk(self, t: int | None, block: str, chunk: int) -> np.ndarray:
        """All rows of one chunk of (t, block), as stored. The one place feature values are read.

        Raises IncompleteRunError for a chunk not marked done, DamagedChunkError for a done chunk
        whose file (or that of its failure flags) is missing or undecodable (`featurestore verify
        --repair` marks it to redo), NonFiniteError for inf/NaN in rows of images that did not fail."""
        self.array(t, block)  # refuses an unknown t or block
        name = f"{timestep_key(t)}/{block}"
        where = f"run {self.run_id} array {name} chunk {chunk}"
        if not 0 <= chunk < self.n_chunks:
            raise StoreError(f"{where}: no such chunk (the run has {self.n_chunks})")
        if not self.chunk_done(chunk):
            raise IncompleteRunError(f"{where} is not extracted yet; re-run the same `featurestore extract` to resume")
        failed = self._stored("failed", chunk).astype(bool)
        values = self._stored(name, chunk, failed)
        if values.dtype.kind == "f":
            bad = _nonfinite_rows(values) & ~failed
            if bad.any():
                raise NonFiniteError(
                    f"{where} holds non-finite values (inf/NaN) for {int(bad.sum())} images"
                    f"{' (float16 overflow: values beyond 65504)' if values.dtype == np.float16 else ''}; "
                    "extract again with --dtype float32 (a new run)"
                )
        return values

    def damaged_arrays(self, chunk: int) -> dict[str, str]:
        """For a done chunk: the per-chunk arrays (`chunk_arrays`) whose chunk file is missing
        or cannot be decoded, name -> problem. Empty when the chunk is sound."""
        problems: dict[str, str] = {}
        try:
            failed = self._stored("failed", chunk).astype(bool)
        except DamagedChunkError as exc:
            problems["failed"], failed = exc.problem, None
        for name in self.chunk_arrays():
            if name == "failed":
                continue
            try:
                self._stored(name, chunk, failed)
            except DamagedChunkError as exc:
                problems[name] = exc.problem
        return problems

    def _stored(self, name: str, chunk: int, failed: np.ndarray | None = None) -> np.ndarray:
        """Chunk `chunk` of the per-chunk array `name` as stored: rows (n, ...) of a feature or
        failure column, or the (1, n_arrays, 2) slice of "nonfinite".

        Raises DamagedChunkError when the chunk's file is missing or cannot be decoded. A missing
        file is accepted only in runs written before every chunk got its file: there an all-zero
        chunk was not stored (failure columns and counts of a chunk without failures; features
        of a chunk whose images all failed, which `failed` tells)."""
        array = self._get(name)
        where = f"run {self.run_id} array {name} chunk {chunk}"
        is_feature = name not in ("failed", "error", "nonfinite")
        absent_ok = not self.attrs.get("every_chunk_stored") and (
            not is_feature or (failed is not None and bool(failed.all())))
        if not absent_ok and not _chunk_exists(array, chunk):
            raise _damaged(where, "is marked done but its file is missing")
        try:
            return array[chunk : chunk + 1] if name == "nonfinite" else array[self.chunk_slice(chunk)]
        except Exception as exc:  # noqa: BLE001 - any codec or I/O error means the chunk is damaged
            raise _damaged(where, f"cannot be decoded ({type(exc).__name__}: {exc})") from None

    def numpy(self, t: int | None, block: str, rows: slice | np.ndarray | None = None,
              draws: str | int = "mean") -> np.ndarray:
        """Features of (t, block) as an (n, C, H, W) array of the stored dtype, for all rows, a
        slice, or row indices (any order); in a run of several noise draws as `draws` selects them
        (`select_draws`: "mean" float32, k as stored, "all" (n, K, C, H, W)). Every row asked for
        must be done and not failed: pass `rows=run.usable_rows()` to skip failed images. Raises
        StoreError (subclasses as in `read_chunk`) otherwise."""
        if rows is None or isinstance(rows, slice):
            index = np.arange(len(self))[rows if rows is not None else slice(None)]
        else:
            index = np.asarray(rows, dtype=np.int64)
        self._check_usable(index)
        return self.read_rows(t, block, index, draws=draws)

    def read_rows(self, t: int | None, block: str, rows: np.ndarray,
                  shaped: Callable[[np.ndarray], np.ndarray] = lambda x: x,
                  advance: Callable[[int], None] | None = None, draws: str | int = "mean") -> np.ndarray:
        """shaped(features) of (t, block) for run rows in any order: each chunk holding some of
        them is read once and whole through `read_chunk` (its refusals apply; a slice of whole
        chunks reads ~3x faster than zarr's integer selection), its draws selected
        (`select_draws`) and shaped on its own, so one raw chunk is held at a time. `shaped` maps
        (n, C, H, W) to (n, ...) (e.g. pooling; default: as selected); with draws="all" it is
        applied to every draw, giving (n, K, ...). `advance(n)` (a progress bar's) is called with
        each chunk's row count. Rows are not checked further: pass usable rows (`numpy` checks
        them). StoreError for a draw the run does not hold, before anything is read."""
        arr = self.array(t, block)  # an unknown (t, block) fails here, as a StoreError
        index = np.asarray(rows, dtype=np.int64)
        k = self.noise_draws

        def selected(raw: np.ndarray) -> np.ndarray:
            x = select_draws(raw, k, draws)
            if draws != "all":
                return shaped(x)
            flat = shaped(x.reshape(-1, *x.shape[2:]))
            return flat.reshape(len(x), x.shape[1], *flat.shape[1:])

        example = selected(np.zeros((1, *arr.shape[1:]), dtype=arr.dtype))
        out = np.empty((len(index), *example.shape[1:]), dtype=example.dtype)
        chunk_of = index // self.chunk_rows
        for c in np.unique(chunk_of):
            at = np.flatnonzero(chunk_of == c)
            out[at] = selected(self.read_chunk(t, block, int(c))[index[at] - c * self.chunk_rows])
            if advance is not None:
                advance(len(at))
        return out

    def split_rows(self, split: str, allow_incomplete: bool = False) -> np.ndarray:
        """Sorted int64 run rows of the usable images (extracted, not failed) whose split column
        is `split`: the rows of `split(...)`'s X and y, in that order, and valid `rows=` for
        `numpy` and FeatureDataset. Raises StoreError when no image of the run has that split
        (naming the splits it has), IncompleteRunError as `usable_rows`."""
        splits = self.images.split
        if split not in set(splits.tolist()):
            raise StoreError(f"run {self.run_id} has no images of split {split!r}; its images are in splits: "
                             f"{_counts(splits)}")
        usable = self.usable_rows(allow_incomplete)
        return usable[splits[usable] == split]

    def split(self, split: str, *, t: int | None, block: str, pool: int | None = None,
              allow_incomplete: bool = False, draws: str | int = "mean") -> tuple[np.ndarray, np.ndarray]:
        """(X, y) of one split's usable images, for fitting with numpy or scikit-learn: X float32
        (n, C*h*w), the features of (t, block) adaptive-average-pooled to pool x pool
        (`featurestore.pooling.pooled`; None: the full h x w map; maps already that small are
        kept), flattened per image; y int64 (n,) labels. Row i of both is run row
        `split_rows(split)[i]`. `draws` as `select_draws` (pooled after the mean); "all" gives
        every draw its own row: X (n*K, D) and y (n*K,), the K draws of an image in consecutive
        rows, draw order. Raises StoreError as `split_rows` and `read_chunk`, for an unknown t or
        block and a draw the run lacks; ValueError for pool < 1."""
        self.array(t, block)  # an unknown (t, block) fails before anything is read
        rows = self.split_rows(split, allow_incomplete)
        x = self.read_rows(t, block, rows, lambda x: pooled(x, pool), draws=draws)
        if draws == "all":
            return x.reshape(-1, x.shape[-1]), np.repeat(self.labels[rows], x.shape[1])
        return x, self.labels[rows]

    def to_xarray(self, t: int | None | Sequence[int | None] = None, *, block: str, allow_incomplete: bool = False,
                  draws: str | int = "mean"):
        """Features of `block` as a lazy xarray.DataArray (dask, one dask block per store chunk,
        read through `read_chunk` when computed) of the stored dtype, over the usable images
        (extracted, not failed; pending ones refused unless `allow_incomplete`).

        Dimensions ("image", "channel", "y", "x"), with a leading "timestep" for a list `t`;
        t=None takes the run's timesteps (a "timestep" dimension when it has several). Along
        "image": coordinate `image` (the run row, as `numpy` takes it), `store_row` and every
        images-table column (`dataset`, `id`, `label`, `class_name`, `split`, `domain`,
        `source`); scalar coordinates `block` and (one timestep that is not None) `timestep`.
        `draws` as `numpy` (`select_draws`); "all" adds a "draw" dimension after "image".
        Values equal `run.numpy(t, block, run.usable_rows(), draws)`. Raises StoreError for an
        unknown t or block or draw, IncompleteRunError as `usable_rows`."""
        import dask.array as da
        import xarray as xr

        several = isinstance(t, (list, tuple, np.ndarray)) or (t is None and len(self.timesteps) > 1)
        ts = list(self.timesteps) if t is None else list(t) if several else [t]
        if not ts:
            raise StoreError(f"run {self.run_id}: no timestep asked for; timesteps: {self.timesteps}")
        for step in ts:
            self.array(step, block)  # refuses an unknown t or block
        rows = self.usable_rows(allow_incomplete)
        parts = [self.dask(step, block)[rows] for step in ts]
        parts = [p.map_blocks(select_draws, self.noise_draws, draws, dtype=select_draws(
            np.zeros((0, *p.shape[1:]), p.dtype), self.noise_draws, draws).dtype,
            drop_axis=[] if draws == "all" or self.noise_draws == 1 else [1],
            new_axis=[1] if draws == "all" and self.noise_draws == 1 else None) for p in parts]
        table = self.images.take(rows)
        coords: dict[str, Any] = {"image": ("image", rows), "store_row": ("image", table.store_row),
                                  **{c: ("image", getattr(table, c)) for c in IMAGE_COLUMNS}, "block": block}
        if several:
            coords["timestep"] = ("timestep", np.asarray(ts))
        elif ts[0] is not None:
            coords["timestep"] = ts[0]
        return xr.DataArray(da.stack(parts) if several else parts[0],
                            dims=(("timestep",) if several else ()) + ("image",)
                            + (("draw",) if draws == "all" else ()) + ("channel", "y", "x"),
                            coords=coords, name=block, attrs={"run_id": self.run_id, "store": self.store.url})

    def status_text(self) -> str:
        """`complete: 2,000 done, 3 failed` or `incomplete: ... , 50 pending` (images); the error
        when the run's bookkeeping cannot be read."""
        try:
            s = self.status()
        except StoreError as exc:
            return f"unreadable: {exc}"
        state = "complete" if s.pending == 0 else "incomplete"
        return f"{state}: {s.done:,} done, {s.failed:,} failed, {s.pending:,} pending"

    def __repr__(self) -> str:
        kind = "writable" if isinstance(self, WritableRun) else "read-only"
        blocks = ", ".join(f"{b} {'x'.join(map(str, chw))}" for b, chw in self.blocks.items())
        return "\n".join([
            f"Run {self.run_id} ({kind}) in {self.store.url}",
            f"  backbone {self.spec.get('backbone', '?')}, dataset {self.spec.get('dataset', '?')}; "
            f"{len(self):,} images, {self.status_text()}",
            f"  timesteps: {', '.join(timestep_text(t) for t in self.timesteps)}",
            f"  blocks (C x H x W): {blocks}",
            f"  dtype {self.attrs.get('dtype', '?')}, {self.chunk_rows:,} rows per chunk",
        ])

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


class WritableRun(Run):
    """A run of a store opened for writing (`WritableStore.run`, `create_run`): the reads of Run,
    chunk writes, claims on chunks and the run's bookkeeping (sessions, finished, redo)."""

    store: WritableStore

    def write_chunk(
        self,
        chunk: int,
        features: Mapping[tuple[int | None, str], np.ndarray],
        failed: np.ndarray,
        errors: Sequence[str],
        nonfinite_computed: Mapping[tuple[int | None, str], int] | None = None,
    ) -> dict[tuple[int | None, str], tuple[int, int]]:
        """Write one whole chunk of rows for every array, then mark it done (last, so a kill
        before the mark leaves the chunk to be written again). Every array gets its chunk file,
        also when all its values are zero, so a done chunk without one is known to be damaged.

        `nonfinite_computed`: per (t, block), the non-finite values the model produced before the
        cast to the stored dtype (None: not counted, taken as the stored count). The stored ones
        are counted here. Returns (computed, stored) per (t, block) with any non-finite value."""
        rows = self.chunk_slice(chunk)
        counts: dict[tuple[int | None, str], tuple[int, int]] = {}
        for (t, block), values in features.items():
            _writer(self.array(t, block))[rows] = values
            stored = int(values.size - np.count_nonzero(np.isfinite(values)))
            computed = stored if nonfinite_computed is None else int(nonfinite_computed.get((t, block), 0))
            if stored or computed:
                counts[(t, block)] = (computed, stored)
        if "nonfinite_keys" in self.attrs:
            keys = self.attrs["nonfinite_keys"]
            table = np.zeros((len(keys), 2), dtype=np.int64)
            for (t, block), pair in counts.items():
                table[keys.index(f"{timestep_key(t)}/{block}")] = pair
            _writer(self._get("nonfinite"))[chunk] = table
        _writer(self._get("failed"))[rows] = np.asarray(failed, dtype=np.uint8)
        _writer(self._get("error"))[rows] = np.asarray(list(errors), dtype=str)
        self._get("done")[chunk] = 1
        return counts

    def record_session(self, session: Mapping[str, Any]) -> None:
        """Append one extraction session (when, how long per phase) to the run's provenance."""
        with self.store.lock.held():
            g = self._fresh_group()
            sessions = [*g.attrs.get("sessions", []), {"ended": _now(), **session}]
            g.attrs["sessions"] = self.attrs["sessions"] = sessions

    def mark_finished(self) -> None:
        with self.store.lock.held():
            g = self._fresh_group()
            self.attrs["finished"] = g.attrs.get("finished")
            if self.attrs["finished"] is None:
                g.attrs["finished"] = self.attrs["finished"] = _now()

    def redo(self, chunks: Sequence[int]) -> None:
        """Mark chunks not done (and the run not finished), so that extracting the same spec
        again computes them."""
        with self.store.lock.held():
            done = self._get("done")
            for c in chunks:
                done[c] = 0
            g = self._fresh_group()
            g.attrs["finished"] = self.attrs["finished"] = None

    def _fresh_group(self) -> zarr.Group:
        """The run's group as stored now (another process may have changed its attributes)."""
        return _node(self.store.group, f"runs/{self.run_id}", self.store.url)

    def claims(self) -> ChunkClaims:
        """Claims on this run's chunks for one writer process (see ChunkClaims)."""
        return ChunkClaims(self)



class ChunkClaims:
    """One writer process's claims on chunks of a run, so that processes extracting the same spec
    split the chunks instead of writing one twice. Use as a context manager (releases every claim
    at exit); `take` before reading a chunk's images, `release` after its `write_chunk`.

    Local stores: a non-blocking OS file lock per chunk under `.featurestore-locks/<run_id>/`,
    released by the OS when the process dies. Stores at URLs have no cross-process lock: there
    every chunk not done is taken (two writers of one spec at a URL may both compute a chunk)."""

    def __init__(self, run: WritableRun):
        self.run = run
        self._folder = None if "://" in run.store.url else Path(run.store.url) / LOCKS / run.run_id
        self._held: dict[int, FileLock] = {}

    def take(self, chunk: int, wait: bool = False) -> bool:
        """Claim `chunk`; False when it is done or another process holds it. With `wait`, wait
        for another process's claim to end first (False if that process wrote the chunk)."""
        if self.run.chunk_done(chunk):
            return False
        if self._folder is None:
            return True
        lock = FileLock(str(self._folder / f"{chunk}.lock"), timeout=-1 if wait else 0, thread_local=False)
        try:
            lock.acquire()
        except Timeout:
            return False
        if self.run.chunk_done(chunk):  # written by another process between the two looks
            lock.release()
            return False
        self._held[chunk] = lock
        return True

    def release(self, chunk: int) -> None:
        """Give up the claim on `chunk` (any thread); its lock file goes once the chunk is done."""
        lock = self._held.pop(chunk, None)
        if lock is None:
            return
        if self.run.chunk_done(chunk):  # a later claimant finds the chunk done, whichever file it locks
            Path(lock.lock_file).unlink(missing_ok=True)
        lock.release()

    def __enter__(self) -> ChunkClaims:
        return self

    def __exit__(self, *exc: object) -> None:
        for chunk in list(self._held):
            self.release(chunk)


def _nonfinite_rows(values: np.ndarray) -> np.ndarray:
    """(n,) bool: rows of a float array holding inf or NaN. float16 is checked on its bits (all
    exponent bits set), several times faster than np.isfinite, which has no fast path for it."""
    if values.dtype == np.float16:
        exponent = np.uint16(0x7C00)
        return ((values.view(np.uint16) & exponent) == exponent).reshape(len(values), -1).any(axis=1)
    return ~np.isfinite(values).reshape(len(values), -1).all(axis=1)


def _chunk_exists(array: zarr.Array, chunk: int) -> bool:
    """Whether the file (object) of chunk `chunk` along the first axis of `array` exists."""
    from zarr.core.sync import sync

    key = array.metadata.encode_chunk_key((chunk,) + (0,) * (array.ndim - 1))
    return sync(array.store_path.store.exists(f"{array.path}/{key}"))


def _node(parent: zarr.Group, path: str, url: str, *, missing_ok: bool = False,
          hint: str = "") -> zarr.Group | zarr.Array | None:
    """parent[path], where a zarr.json that cannot be read is a StoreError naming the file.
    A missing node raises StoreError too, or gives None when `missing_ok`."""
    file = "/".join(p for p in (url.rstrip("/"), parent.path, path, "zarr.json") if p)
    try:
        return parent[path]
    except KeyError:
        if missing_ok:
            return None
        raise StoreError(f"{file} is missing{'; ' + hint if hint else ''}") from None
    except (ValueError, TypeError) as exc:  # JSON or metadata errors of zarr
        raise StoreError(f"{file} is corrupt ({type(exc).__name__}: {exc}){'; ' + hint if hint else ''}") from None


def _child_names(group: zarr.Group) -> list[str]:
    """Names of the folders (prefixes) in a group, read from the store without parsing them."""
    from zarr.core.sync import sync

    async def names() -> list[str]:
        return [k async for k in group.store.list_dir(group.path)]

    return sorted(n for n in sync(names()) if n not in ("zarr.json", LOCKS, MARKER))


def _open_root(url: str, mode: str) -> zarr.Group | None:
    """The store's root group, or None when there is none."""
    try:
        return zarr.open_group(url, mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None
    except zarr.errors.ContainsArrayError as exc:
        raise StoreError(f"{url} holds a zarr array, not a feature store") from exc
    except (ValueError, TypeError) as exc:
        raise StoreError(f"{url.rstrip('/')}/zarr.json is corrupt ({type(exc).__name__}: {exc})") from None


def _is_complete(group: zarr.Group, url: str) -> bool:
    """Whether store creation got to its end: `format_version` (written last) and every images
    column (stores of earlier versions wrote `format_version` first)."""
    if "format_version" not in group.attrs:
        return False
    images = _node(group, "images", url, missing_ok=True)
    return images is not None and all(_node(images, c, url, missing_ok=True) is not None for c in IMAGE_COLUMNS)


def _refuse_foreign(group: zarr.Group, url: str) -> None:
    """Raise StoreError when `group` holds something (attributes or members) but was never
    begun as a feature store."""
    attrs = group.attrs.asdict()
    if "created_by" not in attrs and "format_version" not in attrs and (attrs or _child_names(group)):
        raise StoreError(f"{url} is a zarr group but not a feature store; use another path")


def _check_complete(group: zarr.Group, url: str) -> None:
    """Raise StoreError (one line) unless `group` is a complete store of this format."""
    attrs = group.attrs.asdict()
    if "format_version" not in attrs and "created_by" not in attrs:
        raise StoreError(f"{url} is a zarr group but not a feature store; use another path")
    if attrs.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise StoreError(f"{url}: store format {attrs['format_version']!r}, this version reads {FORMAT_VERSION}")
    if not _is_complete(group, url):
        raise StoreError(f"{url} was interrupted while being created; open it for writing (e.g. extract into it) "
                         "to complete it")


def _create(url: str) -> zarr.Group:
    """Create the store at `url`, or complete one whose creation was interrupted (under the store
    lock; another process may have done it meanwhile). Its first write marks the root as a
    feature store being created (`created_by`), `format_version` is written last."""
    group = zarr.open_group(url, mode="a", attributes={"created_by": package_version()})
    _refuse_foreign(group, url)
    attrs = group.attrs.asdict()
    if attrs.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        return group  # another format: refused by _check_complete, never changed
    if "created_by" not in attrs:  # an empty zarr group that was there before
        group.attrs["created_by"] = package_version()
    if not _is_complete(group, url):
        g = group.require_group("images")
        for c in IMAGE_COLUMNS:
            g.create_array(c, shape=(0,), dtype="int64" if c == "label" else str, chunks=(_TABLE_CHUNK,),
                           dimension_names=("store_row",),
                           overwrite=True)
        g.attrs["rows"] = 0
    if "format_version" not in attrs:
        group.attrs["format_version"] = FORMAT_VERSION
    return group


def _committed_rows(images: zarr.Group) -> int:
    """Rows of the images table that were committed; stores of earlier versions kept no count:
    there it is the shortest column (a killed append lengthened the first columns only)."""
    if "rows" in images.attrs:
        return int(images.attrs["rows"])
    return min(images[c].shape[0] for c in IMAGE_COLUMNS)


def _read_column(array: zarr.Array, n: int | None = None) -> np.ndarray:
    """The first n values (all: None) of a table column as a plain numpy array (zarr returns
    strings as StringDType; users expect "U")."""
    values = array[:n]
    return np.array(values.tolist(), dtype=str) if values.dtype.kind == "T" else values


def _writer(array: zarr.Array) -> zarr.Array:
    """The array, set to store every chunk written, also all-zero ones (zarr keeps that setting
    per handle, not in the metadata)."""
    return array.with_config({"write_empty_chunks": True})


def _damaged(where: str, problem: str) -> DamagedChunkError:
    error = DamagedChunkError(f"{where} {problem}; {_REPAIR_HINT}")
    error.problem = problem
    return error


def _read_text(fs: Any, path: str) -> str:
    try:
        return fs.cat_file(path).decode()
    except OSError:  # deleted meanwhile
        return "marker gone"


def timestep_text(t: int | None) -> str:
    """A timestep as the CLI spells it: "none" for a timestep-free run's None, else the integer."""
    return "none" if t is None else str(t)


def _listed(names: Sequence[str], shown: int = 10) -> str:
    """`a, b, c`, the first `shown` of them and `... (k more)`; `none` when empty."""
    more = f", ... ({len(names) - shown:,} more)" if len(names) > shown else ""
    return (", ".join(map(str, names[:shown])) or "none") + more


def _counts(values: np.ndarray) -> str:
    """`a (3), b (1)`: the distinct values with their counts, most frequent first (for reprs)."""
    names, counts = np.unique(values, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    return _listed([f"{names[i]} ({counts[i]:,})" for i in order])


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
