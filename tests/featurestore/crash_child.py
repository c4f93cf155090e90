"""A store writer that kills itself (SIGKILL) right after a chosen write, for test_crash_safety.py.

    python crash_child.py OPERATION STORE PATTERN K

counts the store writes whose key matches PATTERN (fnmatch, e.g. `zarr.json` for the root
metadata, `images/*` for the images table) and kills itself right after the K-th; K=0 counts
without killing and prints the count. OPERATION is `create` (FeatureStore.open(STORE, "a")) or
`append` (add SECOND to the images table of an existing store). The hook is this script's own:
nothing of it ships in the package.
"""

from __future__ import annotations

import os
import signal
import sys
from fnmatch import fnmatch

from zarr.storage import LocalStore

# run as a script: the helpers next to it are importable by name
from store_builders import manifest  # noqa: E402

from featurestore.store import FeatureStore

FIRST = manifest(["a", "b", "c"], [0, 1, 2])
SECOND = manifest(["c", "x", "a", "y", "z"], [2, 3, 0, 4, 5])


def install_kill(pattern: str, k: int) -> list[str]:
    """Wrap LocalStore._set (every write of a local store); returns the keys written that match."""
    written: list[str] = []
    original = LocalStore._set

    async def set_then_maybe_die(self, key, value, exclusive=False):
        await original(self, key, value, exclusive=exclusive)
        if fnmatch(key, pattern):
            written.append(key)
            if len(written) == k:
                os.kill(os.getpid(), signal.SIGKILL)

    LocalStore._set = set_then_maybe_die
    return written


def main(operation: str, path: str, pattern: str, k: int) -> None:
    written = install_kill(pattern, k)
    if operation == "create":
        FeatureStore.open(path, "a")
    else:
        FeatureStore.open(path, "a").add_images("toy", SECOND)
    print(len(written))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
