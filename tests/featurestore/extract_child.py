"""`featurestore extract` that logs every chunk it writes, for test_extract_store.py.

    python extract_child.py LOG extract OPTIONS...

The wrapper (this script's own, not shipped) appends each chunk index to LOG after writing it,
and takes 0.2 s per chunk so that two processes started together overlap."""

from __future__ import annotations

import sys
import time

from cli.main import app
from featurestore.store import WritableRun

_write_chunk = WritableRun.write_chunk


def logged_write_chunk(self, chunk, *args, **kwargs):
    time.sleep(0.2)
    counts = _write_chunk(self, chunk, *args, **kwargs)
    with open(sys.argv[1], "a") as log:
        log.write(f"{chunk}\n")
    return counts


if __name__ == "__main__":
    WritableRun.write_chunk = logged_write_chunk
    app(sys.argv[2:], prog_name="featurestore")
