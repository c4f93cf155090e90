"""Helpers of the extraction tests: a small demo spec (`config`), the one run of a store, and an
extraction killed with SIGKILL once it has finished some chunks (the start of every
resume-after-kill test)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from featurestore.store import FeatureStore, Run
from pipelines.extract.runner import ExtractConfig

ROOT = Path(__file__).resolve().parents[2]
IMAGES = 6
TIMESTEPS = [10, 300]
BLOCKS = ["block1", "block3"]


def config(store: Path, **changes) -> ExtractConfig:
    """ddpm-mnist on the first IMAGES demo digits at TIMESTEPS, BLOCKS; chunks of 2 rows, batches of 4."""
    cfg = ExtractConfig(store=str(store), backbone="ddpm-mnist", dataset="demo", limit=IMAGES, timesteps=TIMESTEPS,
                        blocks=BLOCKS, batch_size=4, chunk_rows=2, progress=False)
    return replace(cfg, **changes)


def only_run(store: Path) -> Run:
    (run,) = FeatureStore.open(str(store)).runs()
    return run


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
