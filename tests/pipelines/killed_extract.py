"""An extraction killed with SIGKILL once it has finished some chunks: the start of every
resume-after-kill test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def kill_extract_after(args: list[str], store: Path, done_chunks: int, timeout: float = 120) -> None:
    """Run `featurestore extract *args --store store` in a child process and kill -9 it as soon as
    `done_chunks` chunks are marked done; fails the test when it ends before that."""
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "extract", *args, "--store", str(store)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(store.glob("runs/*/done/c/*"))) >= done_chunks:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"extraction ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
