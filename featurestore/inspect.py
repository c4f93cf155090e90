"""`featurestore inspect`: what a store holds, as one JSON-ready document."""

from __future__ import annotations

from typing import Any

from featurestore.store import FeatureStore, Run, StoreError, timestep_key
from featurestore.targets import describe_targets

FAILED_IDS_SHOWN = 50


def inspect_store(url: str) -> dict[str, Any]:
    """Per run: run_id, spec, (timestep, block) -> array path, shape and non-finite counts, image
    counts. Runs whose metadata cannot be read are listed under `broken_runs` with the error.
    `targets` (only in a store that has targets): every target array (featurestore/targets.py) with
    path, shape and dtype."""
    store = FeatureStore.open(url, mode="r")
    runs = []
    broken = store.broken_runs()
    for run_id in store.run_ids():
        try:
            runs.append(_describe(store.run(run_id)))
        except StoreError as exc:
            broken[run_id] = str(exc)
    return {
        "store": str(url),
        "format_version": store.group.attrs["format_version"],
        "images": len(store.images),
        "runs": runs,
        **({"targets": targets} if (targets := describe_targets(store)) else {}),  # absent: the store has none
        "incomplete_runs": store.incomplete_run_ids(),  # killed while being created; rebuilt by a re-run
        "broken_runs": broken,  # run id -> error (corrupt metadata); `featurestore verify` checks the rest
    }


def _describe(run: Run) -> dict[str, Any]:
    status = run.status()
    nonfinite = run.nonfinite()  # None: a run written before non-finite values were counted
    return {
        "run_id": run.run_id,
        "spec": run.spec,
        "codec": run.codec,  # zstd (lossless), bitround:K or int8; runs whose spec lacks it are zstd
        "ensemble": run.spec.get("ensemble", 1),  # noise draws averaged per stored array; 1 when the spec lacks it
        "blocks": run.blocks,
        "timesteps": run.timesteps,
        "arrays": [
            {
                "timestep": t,
                "block": block,
                "path": run.array_path(t, block),
                "shape": list(run.array(t, block).shape),
                "dtype": str(run.array(t, block).dtype),
                "chunks": list(run.array(t, block).chunks),
                "nonfinite": None if nonfinite is None else nonfinite[f"{timestep_key(t)}/{block}"],
            }
            for t in run.timesteps
            for block in run.blocks
        ],
        "images": status.images,
        "done": status.done,
        "failed": status.failed,
        "pending": status.pending,
        "failed_ids": dict(list(status.failed_ids.items())[:FAILED_IDS_SHOWN]),
        "complete": status.pending == 0,
        "created": run.attrs.get("created"),
        "finished": run.attrs.get("finished"),
        "provenance": run.provenance,
        "sessions": run.attrs.get("sessions", []),
    }
