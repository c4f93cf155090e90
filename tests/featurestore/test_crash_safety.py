"""Store-level metadata survives a kill -9 (or a full disk) at any write: the images table append
and store creation, killed at exact writes in a child process (crash_child.py), then resumed."""

from __future__ import annotations

import errno
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zarr
from crash_child import FIRST, SECOND

from featurestore.store import IMAGE_COLUMNS, FeatureStore, StoreError

CHILD = Path(__file__).with_name("crash_child.py")


def _child(operation: str, path: Path, pattern: str, k: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHILD), operation, str(path), pattern, str(k)],
                          capture_output=True, text=True, timeout=120)


def _killed(operation: str, path: Path, pattern: str, k: int) -> None:
    done = _child(operation, path, pattern, k)
    assert done.returncode == -9, f"not killed at write {k} of {pattern}: rc {done.returncode} {done.stderr[-2000:]}"


def _writes(operation: str, tmp_path: Path, pattern: str) -> int:
    """How many writes matching `pattern` the operation makes when nothing kills it."""
    path = tmp_path / "count.zarr"
    if operation == "append":
        FeatureStore.open(path, "a").add_images("toy", FIRST)
    done = _child(operation, path, pattern, 0)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


def dump(path: Path) -> dict:
    """Everything a reader of the store can see: every node's attributes, every array's shape,
    dtype and values."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr notes the lock folder, which is not a zarr node
        root = zarr.open_group(str(path), mode="r")
        out[""] = root.attrs.asdict()
        for name, node in root.members(max_depth=None):
            if isinstance(node, zarr.Array):
                out[name] = (node.shape, str(node.dtype), node[:].tolist(), node.attrs.asdict())
            else:
                out[name] = node.attrs.asdict()
    return out


def _table(store: FeatureStore) -> list[tuple]:
    t = store.images
    return list(zip(*(getattr(t, c).tolist() for c in IMAGE_COLUMNS), strict=True))


@pytest.fixture
def clean(tmp_path) -> tuple[Path, np.ndarray]:
    """A store to which FIRST, then SECOND were added without interruption, and SECOND's rows."""
    path = tmp_path / "clean.zarr"
    store = FeatureStore.open(path, "a")
    store.add_images("toy", FIRST)
    return path, store.add_images("toy", SECOND)


def _append_killed_then_resumed(tmp_path: Path, k: int, clean: tuple[Path, np.ndarray], last: bool) -> None:
    path = tmp_path / f"killed{k}.zarr"
    store = FeatureStore.open(path, "a")
    store.add_images("toy", FIRST)
    before = _table(store)
    _killed("append", path, "images/*", k)
    clean_path, clean_rows = clean
    # until its last write (the row count) the append is invisible: the table is the one before it
    assert _table(FeatureStore.open(path)) == (_table(FeatureStore.open(clean_path)) if last else before)
    rows = FeatureStore.open(path, "a").add_images("toy", SECOND)
    assert rows.tolist() == clean_rows.tolist() == [2, 3, 0, 4, 5]
    assert dump(path) == dump(clean_path)


def test_append_killed_after_its_first_write_to_the_images_table(tmp_path, clean):
    _append_killed_then_resumed(tmp_path, 1, clean, last=False)


@pytest.mark.slow
def test_append_killed_after_any_write_to_the_images_table(tmp_path, clean):
    n = _writes("append", tmp_path, "images/*")
    assert n >= 2 * len(IMAGE_COLUMNS) + 1  # each column resized and written, then the count
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda k: _append_killed_then_resumed(tmp_path, k, clean, last=k == n), range(1, n + 1)))


def _create_killed_then_resumed(tmp_path: Path, pattern: str, k: int, last: bool) -> None:
    path = tmp_path / f"created{pattern.replace('*', '')}{k}.zarr"
    _killed("create", path, pattern, k)
    if not last:  # before its last write the store is not complete: one line says so
        with pytest.raises(StoreError, match="interrupted while being created") as err:
            FeatureStore.open(path, "r")
        assert "\n" not in str(err.value)
    FeatureStore.open(path, "a").add_images("toy", FIRST)
    clean = tmp_path / f"clean{pattern.replace('*', '')}{k}.zarr"
    FeatureStore.open(clean, "a").add_images("toy", FIRST)
    assert dump(path) == dump(clean)


def test_creation_killed_after_its_first_write_of_the_root_metadata(tmp_path):
    _create_killed_then_resumed(tmp_path, "zarr.json", 1, last=False)


@pytest.mark.slow
def test_creation_killed_after_any_write(tmp_path):
    n = _writes("create", tmp_path, "*")
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda k: _create_killed_then_resumed(tmp_path, "*", k, last=k == n), range(1, n + 1)))


def test_full_disk_at_any_write_of_store_creation(tmp_path, monkeypatch):
    """ENOSPC at the k-th write: the store is refused in one line until an open for writing
    completes it, and then it is the store an uninterrupted creation makes."""
    from zarr.storage import LocalStore

    original = LocalStore._set
    FeatureStore.open(tmp_path / "clean.zarr", "a")
    expected = dump(tmp_path / "clean.zarr")
    k = 0
    while True:
        k += 1
        writes = []

        async def full_disk(self, key, value, exclusive=False):
            if len(writes) + 1 == k:
                raise OSError(errno.ENOSPC, "No space left on device")
            writes.append(key)
            await original(self, key, value, exclusive=exclusive)

        monkeypatch.setattr(LocalStore, "_set", full_disk)
        path = tmp_path / f"full{k}.zarr"
        try:
            FeatureStore.open(path, "a")
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        else:
            break  # k is past the last write
        monkeypatch.setattr(LocalStore, "_set", original)
        if k > 1:
            with pytest.raises(StoreError, match="interrupted while being created"):
                FeatureStore.open(path, "r")
        FeatureStore.open(path, "a")
        assert dump(path) == expected, k
    assert k > 5  # root, images group, its columns, the count, format_version


@pytest.mark.parametrize("mode", ["r", "a"])
def test_store_of_an_earlier_version_killed_after_format_version(tmp_path, mode):
    """Earlier versions wrote format_version first: such a store without its images table is
    reported in one line ("r") or completed ("a")."""
    path = tmp_path / "old.zarr"
    zarr.open_group(str(path), mode="w").attrs.update({"format_version": 1, "created_by": "0.1.0"})
    if mode == "r":
        with pytest.raises(StoreError, match="interrupted while being created"):
            FeatureStore.open(path, "r")
        return
    FeatureStore.open(path, "a").add_images("toy", FIRST)
    assert _table(FeatureStore.open(path)) == [
        ("toy", i, lab, c, s, d, src) for i, lab, c, s, d, src in zip(*(FIRST[c] for c in IMAGE_COLUMNS[1:]))]


def test_table_of_an_earlier_version_with_uneven_columns_reads_its_shortest(tmp_path):
    """An earlier version killed mid-append left the first columns longer: the rows all columns
    have are the table, and the next append overwrites the rest."""
    path = tmp_path / "old.zarr"
    FeatureStore.open(path, "a").add_images("toy", FIRST)
    g = zarr.open_group(str(path), mode="a")["images"]
    del g.attrs["rows"]  # an earlier version kept no count
    for c in ("dataset", "id"):
        g[c].resize((5,))
        g[c][3:] = np.array(["half", "written"])
    store = FeatureStore.open(path, "a")
    assert len(store.images) == 3
    assert store.add_images("toy", SECOND).tolist() == [2, 3, 0, 4, 5]
    assert store.images.id.tolist() == ["a", "b", "c", "x", "y", "z"]
    assert {c: g[c].shape[0] for c in IMAGE_COLUMNS} == {c: 6 for c in IMAGE_COLUMNS}
