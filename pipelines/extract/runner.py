"""The extraction runner: Reader -> Mapper -> Writer over the chunks of a run that are not done.

Decoding of the next chunk and writing of the previous one run on background threads while the
model computes the current one; each phase is timed. The expensive part, one forward per
(batch, t) capturing every requested block, happens once per (image, timestep) for the life of
a store: a re-run continues where the last one stopped and a finished spec writes nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data_manifests.manifest import Manifest, ManifestError, load_dataset, load_manifest
from featurestore.store import FeatureStore, Run
from pipelines.extract.backbone import Backbone, create_backbone
from pipelines.extract.noise import NOISE_MODES, noisy_input
from pipelines.extract.reader import Chunk, read_chunk

DTYPES = {"float16": torch.float16, "float32": torch.float32}
CHUNK_TARGET_BYTES = 16 << 20  # the largest array's chunk stays near this
MAX_CHUNK_ROWS = 256


@dataclass
class ExtractConfig:
    """Everything `featurestore extract` takes. Fields in `spec()` decide the run id."""

    store: str
    backbone: str
    dataset: str | None = None
    manifest: Path | None = None
    data_root: Path | None = None
    weights: Path | None = None
    backbone_config: Path | None = None
    timesteps: list[int] = field(default_factory=lambda: [100])
    blocks: list[str] | None = None  # None: all blocks of the backbone
    limit: int | None = None
    batch_size: int = 32
    seed: int = 0
    noise: str = "ddpm"
    prompt: str = "null"
    pool: dict[str, int] = field(default_factory=dict)  # block -> output size; "*" for every block
    dtype: str = "float16"
    device: str = "cpu"
    chunk_rows: int | None = None  # layout of a new run; None: from the block sizes
    progress: bool = True


@dataclass
class ExtractResult:
    store: str
    run_id: str
    images: int
    done: int
    failed: dict[str, str]  # image id -> error, over the whole run
    chunks_written: int
    chunks_skipped: int
    seconds: dict[str, float]  # read (waiting for decode), compute, write (waiting for the writer), total
    images_timesteps_per_s: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def extract(cfg: ExtractConfig) -> ExtractResult:
    """Run (or continue) the extraction of `cfg` into its store."""
    check_device(cfg.device)
    cfg = replace(cfg, timesteps=sorted(cfg.timesteps))  # the order given does not change the run
    manifest = _load_manifest(cfg)
    backbone = create_backbone(cfg.backbone, cfg.weights, read_backbone_config(cfg.backbone_config), cfg.device)
    blocks = resolve_blocks(backbone, cfg.blocks)
    pool = resolve_pool(cfg.pool, blocks)
    _check_options(cfg, backbone)
    shapes = {b: (backbone.blocks[b][0], pool[b], pool[b]) if b in pool else backbone.blocks[b] for b in blocks}

    store = FeatureStore.open(cfg.store, mode="a")
    rows = store.add_images(manifest.name, {
        "id": manifest.ids, "label": manifest.labels, "class_name": manifest.class_names,
        "split": manifest.splits, "domain": manifest.domains, "source": manifest.sources,
    })
    run = store.create_run(
        run_spec(cfg, manifest, backbone, blocks, pool),
        arrays=shapes, timesteps=cfg.timesteps, rows=rows,
        chunk_rows=cfg.chunk_rows or default_chunk_rows(shapes, cfg.dtype), dtype=cfg.dtype,
        provenance={
            "backbone": backbone.describe(),
            "weights": str(cfg.weights) if cfg.weights else "default",
            "manifest": {"name": manifest.name, "root": str(manifest.root), "digest": manifest.digest(),
                         "classes": list(manifest.classes)},
        },
    )
    todo = [c for c, done in enumerate(run.done_chunks()) if not done]
    seconds = _run_chunks(run, todo, manifest, backbone, blocks, pool, cfg)
    if not todo or run.done_chunks().all():
        run.mark_finished()
    status = run.status()
    work = sum(run.chunk_len(c) for c in todo) * len(cfg.timesteps)
    return ExtractResult(
        store=str(cfg.store), run_id=run.run_id, images=len(run), done=status.done,
        failed=status.failed_ids,
        chunks_written=len(todo), chunks_skipped=run.n_chunks - len(todo), seconds=seconds,
        images_timesteps_per_s=work / seconds["total"] if todo else 0.0,
    )


def run_spec(cfg: ExtractConfig, manifest: Manifest, backbone: Backbone, blocks: list[str], pool: dict[str, int]) -> dict:
    """What decides the arrays' values, hence the run id. Batch size, device and paths do not."""
    return {
        "dataset": manifest.name,
        "manifest_digest": manifest.digest(),
        "images": len(manifest),
        "backbone": backbone.name,
        "backbone_config": read_backbone_config(cfg.backbone_config),
        "weights_digest": backbone.weights_digest,
        "timesteps": list(cfg.timesteps),
        "blocks": blocks,
        "noise": cfg.noise,
        "seed": cfg.seed,
        "prompt": cfg.prompt,
        "pool": pool,
        "dtype": cfg.dtype,
    }


def resolve_blocks(backbone: Backbone, blocks: Sequence[str] | None) -> list[str]:
    """The requested blocks in forward order; None means all."""
    if not blocks:
        return list(backbone.blocks)
    unknown = [b for b in blocks if b not in backbone.blocks]
    if unknown:
        raise ValueError(f"{backbone.name} has no block {', '.join(unknown)}; blocks: {', '.join(backbone.blocks)}")
    return [b for b in backbone.blocks if b in set(blocks)]


def resolve_pool(pool: dict[str, int], blocks: list[str]) -> dict[str, int]:
    """Pooling per block: an explicit entry wins over "*" (every block)."""
    unknown = [b for b in pool if b != "*" and b not in blocks]
    if unknown:
        raise ValueError(f"--pool names block {', '.join(unknown)}, which is not extracted; blocks: {', '.join(blocks)}")
    if any(size < 1 for size in pool.values()):
        raise ValueError("--pool sizes must be positive integers")
    return {b: pool.get(b, pool.get("*")) for b in blocks if b in pool or "*" in pool}


def default_chunk_rows(shapes: dict[str, tuple[int, int, int]], dtype: str) -> int:
    """Rows per chunk: a power of two that keeps the largest array's chunk near 16 MiB."""
    per_image = max(int(np.prod(s)) for s in shapes.values()) * np.dtype(dtype).itemsize
    rows = max(1, min(MAX_CHUNK_ROWS, CHUNK_TARGET_BYTES // per_image))
    return 1 << (rows.bit_length() - 1)


def compute_chunk(
    backbone: Backbone, chunk: Chunk, ids: Sequence[str], blocks: list[str], pool: dict[str, int],
    cfg: ExtractConfig, on_batch: Callable[[int], None] = lambda n: None,
) -> dict[tuple[int, str], np.ndarray]:
    """Mapper: every (t, block) of one chunk; failed rows stay zero. One forward per (batch, t)."""
    n = len(ids)
    ok = np.flatnonzero(~chunk.failed)
    store_dtype = DTYPES[cfg.dtype]
    out: dict[tuple[int, str], np.ndarray] = {}
    alphas = backbone.alphas_cumprod()
    for start in range(0, len(ok), cfg.batch_size):
        rows = ok[start : start + cfg.batch_size]
        batch_ids = [ids[i] for i in rows]
        with torch.inference_mode():
            x0 = backbone.prepare(torch.from_numpy(chunk.pixels[rows]).to(cfg.device))
            for t in cfg.timesteps:
                x_t = noisy_input(x0, batch_ids, t, cfg.noise, cfg.seed, alphas)
                t_batch = torch.full((len(rows),), t, device=x0.device, dtype=torch.long)
                for block, h in backbone.forward_blocks(x_t, t_batch, blocks).items():
                    if block in pool:
                        h = F.adaptive_avg_pool2d(h, pool[block])
                    values = h.to(store_dtype).cpu().numpy()
                    if (t, block) not in out:
                        out[(t, block)] = np.zeros((n, *values.shape[1:]), dtype=values.dtype)
                    out[(t, block)][rows] = values
        on_batch(len(rows))
    return out


def _run_chunks(
    run: Run, todo: list[int], manifest: Manifest, backbone: Backbone, blocks: list[str],
    pool: dict[str, int], cfg: ExtractConfig,
) -> dict[str, float]:
    """Read ahead one chunk, compute the current one, write the previous one in the background."""
    from rich.progress import (
        BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
    )

    seconds = {"read": 0.0, "compute": 0.0, "write": 0.0, "total": 0.0}
    if not todo:
        return seconds
    begin = time.perf_counter()
    total = sum(run.chunk_len(c) for c in todo)
    progress = Progress(
        TextColumn("[bold]extract[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        disable=not cfg.progress,
    )
    task = progress.add_task(f"{run.run_id} ({len(cfg.timesteps)} t x {len(blocks)} blocks)", total=total, rate="")

    def advance(n: int) -> None:
        progress.advance(task, n)
        elapsed = time.perf_counter() - begin
        speed = progress.tasks[task].completed / elapsed if elapsed else 0.0
        progress.update(task, rate=f"{speed:.1f} img/s ({speed * len(cfg.timesteps):.1f} img*t/s)")

    def read(c: int) -> Chunk:
        s = run.chunk_slice(c)
        return read_chunk(manifest, range(s.start, s.stop), backbone.input, decoders)

    with ThreadPoolExecutor(4) as decoders, ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer, progress:
        next_chunk: Future = reader.submit(read, todo[0])
        last_write: Future | None = None
        for k, c in enumerate(todo):
            tic = time.perf_counter()
            chunk = next_chunk.result()
            if k + 1 < len(todo):
                next_chunk = reader.submit(read, todo[k + 1])
            seconds["read"] += time.perf_counter() - tic

            tic = time.perf_counter()
            s = run.chunk_slice(c)
            features = compute_chunk(backbone, chunk, manifest.ids[s], blocks, pool, cfg, advance)
            seconds["compute"] += time.perf_counter() - tic

            tic = time.perf_counter()
            if last_write is not None:
                last_write.result()  # at most one chunk waits in memory for the disk
            last_write = writer.submit(run.write_chunk, c, features, chunk.failed, chunk.errors)
            seconds["write"] += time.perf_counter() - tic
        tic = time.perf_counter()
        last_write.result()
        seconds["write"] += time.perf_counter() - tic
    seconds["total"] = time.perf_counter() - begin
    run.record_session({"chunks": len(todo), "seconds": {k: round(v, 3) for k, v in seconds.items()}})
    return seconds


def _load_manifest(cfg: ExtractConfig) -> Manifest:
    if (cfg.dataset is None) == (cfg.manifest is None):
        raise ValueError("give exactly one of --dataset NAME or --manifest PATH")
    manifest = load_dataset(cfg.dataset, cfg.data_root) if cfg.dataset else load_manifest(cfg.manifest, cfg.data_root)
    if cfg.limit is not None:
        if cfg.limit < 1:
            raise ValueError("--limit must be at least 1")
        manifest = manifest.head(cfg.limit)
    if len(manifest.missing()) == len(manifest):
        raise ManifestError(
            f"none of the {len(manifest)} files of {manifest.name!r} exist under {manifest.root}; "
            "point --data-root at the dataset"
        )
    return manifest


def read_backbone_config(path: Path | None) -> dict | None:
    """The JSON of --backbone-config, or None."""
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read --backbone-config {path}: {exc}") from exc


def _check_options(cfg: ExtractConfig, backbone: Backbone) -> None:
    if cfg.noise not in NOISE_MODES:
        raise ValueError(f"--noise {cfg.noise!r} is not available for {backbone.name}; use one of {', '.join(NOISE_MODES)}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, not {cfg.dtype!r}")
    if cfg.prompt != "null" and not backbone.conditional:
        raise ValueError(f"{backbone.name} is unconditional: it takes no prompt (use --prompt null)")
    if cfg.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    n_t = backbone.alphas_cumprod().shape[0]
    bad = [t for t in cfg.timesteps if not 0 <= t < n_t]
    if bad or not cfg.timesteps:
        raise ValueError(f"timesteps must be integers in 0..{n_t - 1} for {backbone.name}; got {cfg.timesteps}")
    if len(set(cfg.timesteps)) != len(cfg.timesteps):
        raise ValueError(f"timesteps repeat: {cfg.timesteps}")


def check_device(device: str) -> None:
    """Refuse a device this torch cannot use, rather than failing mid-run or falling back."""
    try:
        kind = torch.device(device).type
    except RuntimeError as exc:
        raise ValueError(f"--device {device!r} is not a torch device: {exc}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available to this torch build ({torch.__version__})")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available on this machine")
