"""`featurestore verify`: find done chunks whose files are missing or cannot be decoded, and
optionally mark them not done so that extracting the same spec again recomputes them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from featurestore.store import FeatureStore, StoreError


@dataclass(frozen=True)
class Damage:
    """One damaged chunk of one array of a run."""

    run_id: str
    array: str  # "t<T>/<block>", "failed", "error" or "nonfinite"
    chunk: int
    problem: str

    def line(self) -> str:
        return f"run {self.run_id} array {self.array} chunk {self.chunk}: {self.problem}"


@dataclass
class VerifyResult:
    store: str
    runs: list[str]  # the runs checked
    chunks_checked: int  # done chunks, over those runs
    damaged: list[Damage] = field(default_factory=list)
    broken_runs: dict[str, str] = field(default_factory=dict)  # run id -> why it cannot be opened
    repaired: dict[str, list[int]] = field(default_factory=dict)  # run id -> chunks marked not done
    removed: list[str] = field(default_factory=list)  # broken runs deleted by --repair

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.broken_runs

    def lines(self) -> list[str]:
        """One line per damaged chunk and broken run, then a summary."""
        out = [f"damaged: {d.line()}" for d in self.damaged]
        out += [f"broken: run {r}: {why}" for r, why in self.broken_runs.items()]
        summary = (f"{self.store}: {len(self.runs)} runs, {self.chunks_checked} done chunks checked, "
                   f"{len({(d.run_id, d.chunk) for d in self.damaged})} damaged, {len(self.broken_runs)} broken runs")
        out.append(summary)
        if self.repaired:
            n = sum(len(c) for c in self.repaired.values())
            out.append(f"marked {n} chunks not done in runs {', '.join(self.repaired)}: "
                       "extract the same spec again to recompute them")
        if self.removed:
            out.append(f"removed broken runs {', '.join(self.removed)}: extract the same spec again to rebuild them")
        if not (self.repaired or self.removed) and not self.ok:
            out.append("run `featurestore verify STORE --repair`, then extract again")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def verify_store(url: str, run_id: str | None = None, repair: bool = False) -> VerifyResult:
    """Check that every done chunk of every run (or of `run_id`) has a readable file in every
    per-chunk array (features, failure flags and messages, non-finite counts). With `repair`,
    damaged chunks are marked not done and their runs not finished, and broken runs (metadata that
    cannot be read) are removed, so that extracting the same spec again recomputes them.

    Raises StoreError when the store (or the run asked for) cannot be opened."""
    store = FeatureStore.open(url, "r")
    broken = store.broken_runs()
    if run_id is not None:
        run_id = store.match_run_id(run_id)
        broken = {run_id: broken[run_id]} if run_id in broken else {}
        runs = [] if broken else [store.run(run_id)]
    else:
        runs = store.runs()
    result = VerifyResult(store=str(url), runs=[r.run_id for r in runs], chunks_checked=0, broken_runs=broken)
    for run in runs:
        try:
            done = [int(c) for c in run.done_chunks().nonzero()[0]]
            found = [Damage(run.run_id, array, c, problem) for c in done
                     for array, problem in run.damaged_arrays(c).items()]
        except StoreError as exc:  # an array's metadata cannot be read
            result.broken_runs[run.run_id] = str(exc)
            continue
        except Exception as exc:  # noqa: BLE001 - done flags that cannot be decoded
            result.broken_runs[run.run_id] = f"its done flags cannot be read ({type(exc).__name__}: {exc})"
            continue
        result.chunks_checked += len(done)
        result.damaged += found
    if repair and not result.ok:
        writable = FeatureStore.open(url, "a")
        for rid in dict.fromkeys(d.run_id for d in result.damaged if d.run_id not in result.broken_runs):
            chunks = sorted({d.chunk for d in result.damaged if d.run_id == rid})
            writable.run(rid).redo(chunks)
            result.repaired[rid] = chunks
        for rid in result.broken_runs:
            writable.remove_run(rid)
            result.removed.append(rid)
    return result
