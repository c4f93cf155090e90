"""Scale-out on dask: the chunks still to do are split into shards of whole chunks; each worker
process builds its backbone once and writes its own chunks (never a chunk another writes).

Values depend only on (seed, image id, t), so the result is bit-identical to a local run. On a
multi-GPU node start one worker per GPU (`dask worker ADDRESS --nworkers 1` with
CUDA_VISIBLE_DEVICES set per worker, or `--workers N` for CPU); on several nodes every worker
must reach the same store path (a shared file system) or URL (an object store through fsspec).
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import replace

from featurestore.store import FeatureStore, WritableRun
from pipelines.extract.runner import ExtractConfig, Job, job_prompts, prepare_job, run_chunks

SHARDS_PER_WORKER = 2  # a little slack so a slow worker does not hold up the end
_JOBS: dict[str, Job] = {}  # per worker process: the resolved job, backbone included, built once


def shards(todo: list[int], n: int) -> list[list[int]]:
    """Split chunk indices into at most n contiguous, nearly equal, non-empty shards."""
    n = max(1, min(n, len(todo)))
    size, extra = divmod(len(todo), n)
    out, start = [], 0
    for k in range(n):
        stop = start + size + (k < extra)
        out.append(todo[start:stop])
        start = stop
    return out


def extract_shard(cfg: ExtractConfig, run_id: str, chunks: list[int]) -> tuple[dict[str, float], list[int]]:
    """Worker function: compute and write the given chunks of a run that already exists; returns
    `run_chunks`' (seconds per phase, chunks written)."""
    key = repr(cfg)
    if key not in _JOBS:
        _JOBS[key] = prepare_job(cfg)
    job = _JOBS[key]
    run = FeatureStore.open(cfg.store, mode="a").run(run_id)
    job.prompts = job_prompts(job, run.store, run.rows, run.spec.get("captions"))
    return run_chunks(job, run, chunks)


def dask_setup(worker: object) -> None:
    """Preload of the local cluster's workers: they ignore Ctrl-C, which a terminal sends to every
    process of the command; the submitting process alone answers it, and closes them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def quiet() -> None:
    """After Ctrl-C, closing busy workers is expected: no warnings from dask about it."""
    logging.getLogger("distributed").setLevel(logging.CRITICAL)


def run_on_dask(cfg: ExtractConfig, run: WritableRun, todo: list[int]) -> tuple[dict[str, float], list[int]]:
    """Distribute the chunks over a dask cluster: (phase seconds summed over workers, the chunks
    the workers wrote)."""
    from distributed import Client, LocalCluster, as_completed

    begin = time.perf_counter()
    cluster = None
    if cfg.scheduler:
        client = Client(cfg.scheduler)
    else:
        cluster = LocalCluster(n_workers=cfg.workers, threads_per_worker=1, processes=True, dashboard_address=None,
                               preload=[__name__])
        client = Client(cluster)
    try:
        n_workers = len(client.scheduler_info()["workers"])
        if n_workers == 0:
            raise ValueError(f"the dask cluster at {cfg.scheduler} has no workers")
        worker_cfg = replace(cfg, workers=None, scheduler=None, progress=False)
        parts = shards(todo, n_workers * SHARDS_PER_WORKER)
        futures = [client.submit(extract_shard, worker_cfg, run.run_id, part, pure=False) for part in parts]
        seconds = {"read": 0.0, "compute": 0.0, "prepare": 0.0, "write": 0.0}
        written: list[int] = []
        for future in as_completed(futures):
            shard_seconds, shard_written = future.result()
            written += shard_written
            for phase, value in shard_seconds.items():
                if phase in seconds:
                    seconds[phase] += value
    except KeyboardInterrupt:
        quiet()
        if cluster is not None:
            client.run(quiet)
        raise
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return {**seconds, "total": time.perf_counter() - begin, "workers": n_workers}, sorted(written)
