"""The extraction runner: Reader -> Mapper -> Writer over the chunks of a run that are not done.

`extract` resolves a config into a `Job` (manifest, backbone, blocks, timesteps, prompts),
creates or reopens the run, and hands the chunks still to do to a distributor: the local loop
below, or dask workers (`distribute.py`), which all call `run_chunks`. In that loop the next
chunk is decoded and the previous one written on background threads while the model computes
the current one, and each phase is timed. One forward per (batch, t) captures every requested
block; work that does not depend on t (decode, VAE and text encode) happens once per image.
"""

from __future__ import annotations

import contextlib
import errno
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data_manifests.manifest import Manifest, ManifestError, load_dataset, load_manifest
from featurestore.store import (FeatureStore, StoreError, WritableRun, WritableStore, feature_codec, same_spec,
                                 timestep_key)
from pipelines.device import resolve_device
from pipelines.extract.backbone import Backbone, create_backbone
from pipelines.extract.noise import NOISE_MODES, batch_eps, ddim_invert
from pipelines.extract.plan import (
    RAW_MARGIN,
    ArrayPlan,
    Plan,
    Warmup,
    free_space,
    human_bytes,
    input_mismatch,
    sample_rows,
    stored_bytes,
)
from pipelines.extract.prompts import PromptSource, image_tags, parse_prompt, prompts_for
from pipelines.extract.reader import RESIZES, Chunk, read_chunk, write_manifest_targets

DTYPES = {"float16": torch.float16, "float32": torch.float32}
AUTOCAST = ("none", "bf16", "fp16")
CHUNK_TARGET_BYTES = 16 << 20  # the largest array's chunk stays near this
MAX_CHUNK_ROWS = 256


@dataclass
class ExtractConfig:
    """Everything `featurestore extract` takes. Fields in `run_spec()` decide the run id."""

    store: str
    backbone: str
    dataset: str | None = None
    manifest: Path | None = None
    data_root: Path | None = None
    weights: str | Path | None = None
    backbone_config: Path | None = None
    timesteps: list[int] | None = None  # None: the backbone's defaults
    blocks: list[str] | None = None  # None: all blocks of the backbone
    attention_maps: bool = False  # also store <block>.attn cross-attention maps
    limit: int | None = None
    batch_size: int = 32
    seed: int = 0
    noise: str = "ddpm"
    ensemble: int = 1  # store the mean of every block over this many q_sample noise draws
    noise_draws: int = 1  # store this many q_sample noise draws of every block, along a "draw" axis
    ddim_steps: int = 50
    guidance_scale: float = 1.0
    prompt: str = "null"
    captioner: str | None = None  # BLIP folder or hub id (local cache) for --prompt blip
    caption_max_tokens: int = 30
    pool: dict[str, int] = field(default_factory=dict)  # block -> output size; "*" for every block
    resize: str = "crop"  # crop | squash: how images reach the square input (reader.geometry_of)
    dtype: str = "float16"
    codec: str = "zstd"  # zstd (lossless), bitround:K or int8 (featurestore.store.feature_codec)
    device: str = "cpu"
    autocast: str | None = None  # none | bf16 | fp16; None: bf16 on CUDA, none elsewhere
    chunk_rows: int | None = None  # layout of a new run; None: from the block sizes
    workers: int | None = None  # dask LocalCluster with this many worker processes
    scheduler: str | None = None  # address of an existing dask cluster
    progress: bool = True
    retry_failed: bool = False  # compute again the chunks that hold images which failed before
    allow_mismatch: bool = False  # extract colour images with a grey-only backbone (plan.input_mismatch)
    ignore_free_space: bool = False  # start even when the store's device has too little free space
    warmup_images: int = 32  # images a dry run (or a disk check) extracts into a temporary store


@dataclass
class ExtractResult:
    store: str
    run_id: str
    images: int
    done: int
    failed: dict[str, str]  # image id -> error, over the whole run
    chunks_written: int
    chunks_skipped: int
    seconds: dict[str, float]  # waiting on read, compute (prepare: its once-per-image part), waiting on write, total
    images_timesteps_per_s: float
    # "t<T>/<block>" -> {"computed", "stored"}: inf/NaN values over the whole run, only arrays with any
    nonfinite: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


@dataclass
class Job:
    """A config resolved against its manifest, backbone and store: what the chunk loop needs."""

    cfg: ExtractConfig
    manifest: Manifest
    backbone: Backbone
    blocks: list[str]  # in forward order, `<block>.attn` maps included
    pool: dict[str, int]
    timesteps: list[int | None]
    prompt: PromptSource
    prompts: list[str] | None  # one per manifest row, for conditional backbones

    @property
    def shapes(self) -> dict[str, tuple[int, int, int]]:
        table = {**self.backbone.blocks, **self.backbone.attention_maps}
        return {b: (table[b][0], self.pool[b], self.pool[b]) if b in self.pool else tuple(table[b]) for b in self.blocks}


def extract(cfg: ExtractConfig) -> ExtractResult:
    """Run (or continue) the extraction of `cfg` into its store.

    Before anything is written, raises ValueError when the dataset's images do not fit the
    backbone (`check_input_fit`) or the store's device lacks the space (`check_free_space`).
    Raises OSError naming the store when its device gets full all the same. An exception while
    the chunks run (KeyboardInterrupt from Ctrl-C too) carries a note: how many chunks are saved,
    and that the same extraction resumes from there."""
    job = prepare_job(cfg)
    check_input_fit(job)
    check_free_space(job)
    try:
        return _extract(job)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise OSError(f"no space left on the device of the store {cfg.store} ({exc}): free some space or use a "
                      "--store elsewhere; the chunks saved so far are kept, and the same command resumes") from exc


def _extract(job: Job) -> ExtractResult:
    """`extract` once the job is resolved: images, captions, prompts, the run, its chunks."""
    cfg = job.cfg
    store = FeatureStore.open(cfg.store, mode="a")
    manifest = job.manifest
    rows = store.add_images(manifest.name, {
        "id": manifest.ids, "label": manifest.labels, "class_name": manifest.class_names,
        "split": manifest.splits, "domain": manifest.domains, "source": manifest.sources,
    })
    write_manifest_targets(store, manifest, rows, job.backbone.input.size, cfg.resize, cfg.progress, cfg.retry_failed)
    caption_key = ensure_captions(store, job, rows) if job.prompt.kind == "blip" else None
    job.prompts = job_prompts(job, store, rows, caption_key)
    provenance = {
        "backbone": job.backbone.describe(),
        "weights": str(cfg.weights) if cfg.weights else "default",
        "manifest": {"name": manifest.name, "root": str(manifest.root), "digest": manifest.digest(),
                     "classes": list(manifest.classes)},
    }
    if job.prompts is not None:
        provenance["prompts"] = prompt_provenance(job.backbone, job.prompts)
    if cfg.ensemble > 1:
        provenance["ensemble"] = {"draws": cfg.ensemble, "noise_draws": list(range(cfg.ensemble)),
                                  "reduction": "float32 mean of each captured block (after --pool) over the draws"}
    if cfg.noise_draws > 1:
        provenance["noise_draws"] = {"draws": cfg.noise_draws, "axis": "draw (second axis of every array)",
                                     "stream": "image_eps(seed, image id, t, shape, draw) for draw 0..K-1"}
    run = store.create_run(
        run_spec(job, caption_key), arrays=job.shapes, timesteps=job.timesteps, rows=rows,
        chunk_rows=cfg.chunk_rows or default_chunk_rows(job.shapes, cfg.dtype, cfg.noise_draws), dtype=cfg.dtype,
        provenance=provenance,
    )
    if cfg.retry_failed:
        run.redo(sorted({int(r) // run.chunk_rows for r in np.flatnonzero(run.failed & run.rows_done())}))
    todo = [c for c, done in enumerate(run.done_chunks()) if not done]
    done_before = run.n_chunks - len(todo)
    try:
        if todo and (cfg.workers or cfg.scheduler):
            from pipelines.extract.distribute import run_on_dask

            seconds, written = run_on_dask(cfg, run, todo)
        else:
            seconds, written = run_chunks(job, run, todo)
        left = [c for c in todo if not run.chunk_done(c)]
        if left:  # claimed by another process extracting this spec: wait for it, or do them if it died
            more_seconds, more_written = run_chunks(job, run, left, wait_for_claims=True)
            seconds = {k: seconds.get(k, 0.0) + v for k, v in more_seconds.items()}
            written += more_written
    except KeyboardInterrupt as exc:
        saved = int(run.done_chunks().sum())
        run.record_session({"chunks": saved - done_before, "interrupted": True})
        exc.add_note(f"{saved} of {run.n_chunks} chunks of run {run.run_id} are saved; "
                     "run the same command again to resume")
        raise
    if written:
        run.record_session({"chunks": len(written), "seconds": {k: round(v, 3) for k, v in seconds.items()}})
    if run.done_chunks().all():
        run.mark_finished()
    status = run.status()
    work = sum(run.chunk_len(c) for c in written) * len(job.timesteps)
    return ExtractResult(
        store=str(cfg.store), run_id=run.run_id, images=len(run), done=status.done, failed=status.failed_ids,
        chunks_written=len(written), chunks_skipped=run.n_chunks - len(written), seconds=seconds,
        images_timesteps_per_s=work / seconds["total"] if written else 0.0,
        nonfinite={key: c for key, c in (run.nonfinite() or {}).items() if c["stored"] or c["computed"]},
    )


def prepare_job(cfg: ExtractConfig) -> Job:
    """Check every option and build the backbone; nothing is written yet."""
    resolve_device(cfg.device)
    if cfg.autocast is None:
        cfg = replace(cfg, autocast="bf16" if torch.device(cfg.device).type == "cuda" else "none")
    if cfg.autocast not in AUTOCAST:
        raise ValueError(f"--autocast must be one of {', '.join(AUTOCAST)}, not {cfg.autocast!r}")
    autocast(torch.device(cfg.device), cfg.autocast)  # refuse bf16/fp16 off CUDA before any work
    prompt = parse_prompt(cfg.prompt)
    manifest = _load_manifest(cfg)
    backbone = create_backbone(cfg.backbone, cfg.weights, read_backbone_config(cfg.backbone_config), cfg.device)
    timesteps = resolve_timesteps(backbone, cfg.timesteps)
    _check_options(cfg, backbone, prompt)
    blocks = resolve_blocks(backbone, cfg.blocks, cfg.attention_maps)
    return Job(cfg, manifest, backbone, blocks, resolve_pool(cfg.pool, blocks), timesteps, prompt, None)


def run_spec(job: Job, caption_key: str | None) -> dict:
    """What decides the arrays' values, hence the run id. Batch size, device, paths and the
    number of workers do not."""
    cfg, backbone = job.cfg, job.backbone
    return {
        "dataset": job.manifest.name,
        "manifest_digest": job.manifest.digest(),
        "images": len(job.manifest),
        "backbone": backbone.name,
        "backbone_config": read_backbone_config(cfg.backbone_config),
        "weights_digest": backbone.weights_digest,
        "timesteps": job.timesteps,
        "blocks": job.blocks,
        "noise": None if backbone.timestep_free else cfg.noise,
        "ddim": {"steps": cfg.ddim_steps, "guidance_scale": cfg.guidance_scale} if cfg.noise == "ddim-inversion" else None,
        "seed": cfg.seed,
        "prompt": job.prompt.spec if backbone.conditional else None,
        "captions": caption_key,
        "pool": job.pool,
        "dtype": cfg.dtype,
        "autocast": cfg.autocast,  # reduced-precision compute changes the values
        # so does lossy storage; zstd, lossless and the default (SPEC_DEFAULTS), is left out, so
        # that lossless runs keep the ids they had before the codec could be chosen
        **({} if cfg.codec == "zstd" else {"codec": cfg.codec}),
        **({} if cfg.ensemble == 1 else {"ensemble": cfg.ensemble}),  # likewise (SPEC_DEFAULTS: 1)
        **({} if cfg.resize == "crop" else {"resize": cfg.resize}),  # likewise: crop runs keep their ids
        **({} if cfg.noise_draws == 1 else {"noise_draws": cfg.noise_draws}),  # likewise (SPEC_DEFAULTS: 1)
    }


def resolve_timesteps(backbone: Backbone, timesteps: Sequence[int] | None) -> list[int | None]:
    """Sorted timesteps (their order does not change the run); [None] for timestep-free experts."""
    if backbone.timestep_free:
        if timesteps:
            raise ValueError(f"{backbone.name} ignores timesteps (it is stored once per image): drop --timesteps")
        return [None]
    timesteps = list(timesteps or backbone.default_timesteps)
    n_t = backbone.num_timesteps
    if not timesteps or any(not 0 <= t < n_t for t in timesteps):
        raise ValueError(f"timesteps must be integers in 0..{n_t - 1} for {backbone.name}; got {timesteps}")
    if len(set(timesteps)) != len(timesteps):
        raise ValueError(f"timesteps repeat: {timesteps}")
    return sorted(timesteps)


def resolve_blocks(backbone: Backbone, blocks: Sequence[str] | None, attention_maps: bool = False) -> list[str]:
    """The requested blocks in forward order (None: all), each followed by its `.attn` map when asked."""
    if blocks:
        unknown = [b for b in blocks if b not in backbone.blocks]
        if unknown:
            raise ValueError(f"{backbone.name} has no block {', '.join(unknown)}; blocks: {', '.join(backbone.blocks)}")
    chosen = [b for b in backbone.blocks if not blocks or b in set(blocks)]
    if not attention_maps:
        return chosen
    if not backbone.attention_maps:
        raise ValueError(f"{backbone.name} has no cross-attention maps (--attention-maps)")
    return [name for b in chosen for name in (b, f"{b}.attn") if name in backbone.blocks or name in backbone.attention_maps]


def resolve_pool(pool: dict[str, int], blocks: list[str]) -> dict[str, int]:
    """Pooling per block: an explicit entry wins over "*" (every block)."""
    unknown = [b for b in pool if b != "*" and b not in blocks]
    if unknown:
        raise ValueError(f"--pool names block {', '.join(unknown)}, which is not extracted; blocks: {', '.join(blocks)}")
    if any(size < 1 for size in pool.values()):
        raise ValueError("--pool sizes must be positive integers")
    return {b: pool.get(b, pool.get("*")) for b in blocks if b in pool or "*" in pool}


def default_chunk_rows(shapes: dict[str, tuple[int, int, int]], dtype: str, draws: int = 1) -> int:
    """Rows per chunk: a power of two that keeps the largest array's chunk (`draws` maps per row)
    near 16 MiB."""
    per_image = max(int(np.prod(s)) for s in shapes.values()) * np.dtype(dtype).itemsize * draws
    rows = max(1, min(MAX_CHUNK_ROWS, CHUNK_TARGET_BYTES // per_image))
    return 1 << (rows.bit_length() - 1)


# -- before the run: input fit, free space, dry run ----------------------------------------------

def check_input_fit(job: Job) -> None:
    """Raise ValueError when the dataset's images do not fit the backbone's input
    (`plan.input_mismatch`: colour images into a grey-only model), unless --allow-mismatch."""
    if not job.cfg.allow_mismatch:
        problem = input_mismatch(job.manifest, job.backbone.input, job.backbone.name)
        if problem:
            raise ValueError(problem)


def images_to_extract(job: Job) -> int:
    """Images of the job not written yet: those outside the done chunks of a run of the same
    spec already in the store, or all of them (also with --prompt blip, whose spec names
    captions that are not made yet)."""
    if job.prompt.kind == "blip":
        return len(job.manifest)
    try:
        store = FeatureStore.open(job.cfg.store)
    except StoreError:  # no store yet (or not one: the extraction itself says so)
        return len(job.manifest)
    spec = run_spec(job, None)
    for run in store.runs():
        if same_spec(run.spec, spec):
            return sum(run.chunk_len(int(c)) for c in np.flatnonzero(~run.done_chunks()))
    return len(job.manifest)


def check_free_space(job: Job) -> None:
    """Raise ValueError, before anything is written, when the images still to extract would
    not fit in the free space of a local store's device (a URL's is unknown: not checked).

    Their raw size (values x dtype, RAW_MARGIN for the codec's headers) bounds what they take;
    only when that bound exceeds the free space is the stored size measured, by the warm-up of
    `plan`. --ignore-free-space skips the check."""
    cfg = job.cfg
    if cfg.ignore_free_space:
        return
    free, _ = free_space(cfg.store)
    if free is None:
        return
    todo = images_to_extract(job)
    raw = (sum(int(np.prod(s)) for s in job.shapes.values()) * np.dtype(cfg.dtype).itemsize * len(job.timesteps)
           * cfg.noise_draws)
    if todo * raw * RAW_MARGIN <= free:
        return
    measured = plan(job)
    if measured.fits is False:
        less = "--pool, --blocks, --timesteps, --codec int8 or bitround:K"
        less += ", --dtype float16" if cfg.dtype != "float16" else ""
        raise ValueError(
            f"{todo:,} images would take about {human_bytes(measured.expected_bytes_to_write)} "
            f"({human_bytes(measured.stored_bytes_per_image)} per image as stored, measured on "
            f"{measured.warmup.images - measured.warmup.failed} images), but {measured.free_space_at} has "
            f"{human_bytes(measured.free_bytes)} free; store less ({less}), choose a --store with room, "
            "or pass --ignore-free-space")


def dry_run(cfg: ExtractConfig) -> Plan:
    """What `extract` would store and take, from a warm-up (`plan`); the store is not touched.
    Refuses what `extract` refuses before it starts, except the lack of free space (reported)."""
    job = prepare_job(cfg)
    check_input_fit(job)
    return plan(job)


def plan(job: Job) -> Plan:
    """Extract cfg.warmup_images images, evenly spaced over the manifest, into a temporary local
    store: the same `_extract` with the job's spec (codec included), chunk layout and batch size,
    in this process. Its chunk files give the stored bytes per image of every array, and its
    compute and write seconds the time per image; both are scaled to the images still to
    extract. Raises ValueError when no warm-up image could be read."""
    cfg = job.cfg
    rows = sample_rows(len(job.manifest), cfg.warmup_images)
    chunk_rows = cfg.chunk_rows or default_chunk_rows(job.shapes, cfg.dtype, cfg.noise_draws)
    with tempfile.TemporaryDirectory(prefix="featurestore-warmup-") as tmp:
        warm_cfg = replace(cfg, store=str(Path(tmp) / "warmup.zarr"), chunk_rows=chunk_rows, workers=None,
                           scheduler=None, retry_failed=False)
        try:
            result = _extract(replace(job, cfg=warm_cfg, manifest=job.manifest.take(rows), prompts=None))
        except KeyboardInterrupt:
            stop = KeyboardInterrupt()
            stop.add_note(f"interrupted during the warm-up; nothing was written to {cfg.store}")
            raise stop from None
        ok = len(rows) - len(result.failed)
        if ok == 0:
            raise ValueError(f"none of the {len(rows)} warm-up images could be read (first: "
                             f"{next(iter(result.failed.values()))}); nothing to measure")
        run = FeatureStore.open(warm_cfg.store).run(result.run_id)
        keys = {(t, b): f"{timestep_key(t)}/{b}" for t in job.timesteps for b in job.blocks}
        folders = {key: run.array_path(t, b) for (t, b), key in keys.items()}
        measured, other = stored_bytes(Path(warm_cfg.store), folders)
        first = run.array(*next(iter(keys)))
        codecs = [c.to_dict() for c in first.metadata.codecs]
        arrays = []
        for (t, b), key in keys.items():
            dtype = run.array(t, b).dtype
            shape = [*([cfg.noise_draws] if cfg.noise_draws > 1 else []), *job.shapes[b]]  # per image
            arrays.append(ArrayPlan(key, shape, str(dtype), int(np.prod(shape)) * dtype.itemsize, measured[key] / ok))
    warm = Warmup(len(rows), len(result.failed), result.seconds)
    free, where = free_space(cfg.store)
    todo = images_to_extract(job)
    per_image = sum(a.stored_bytes_per_image for a in arrays)
    return Plan(
        store=cfg.store, backbone=job.backbone.name, dataset=job.manifest.name, images=len(job.manifest),
        images_to_extract=todo, chunk_rows=chunk_rows, codecs=codecs, arrays=arrays, other_bytes=other,
        expected_bytes=round(per_image * len(job.manifest)) + other,
        expected_bytes_to_write=round(per_image * todo) + (other if todo == len(job.manifest) else 0),
        expected_seconds=todo * warm.seconds_per_image, warmup=warm, free_bytes=free, free_space_at=where,
    )


# -- prompts and captions -----------------------------------------------------------------------

def ensure_captions(store: WritableStore, job: Job, rows: np.ndarray) -> str:
    """Caption (once, batched) every image of the job that the store has no caption of yet;
    returns the captioner's key, under which later runs find and reuse the captions."""
    from PIL import Image

    from data_manifests.sources import load_image
    from pipelines.extract.captioners import BlipCaptioner

    cfg = job.cfg
    captioner = BlipCaptioner(cfg.captioner, device=cfg.device, max_new_tokens=cfg.caption_max_tokens)
    _, done = store.captions(captioner.key)
    todo = np.flatnonzero(~done[rows])
    batch = captioner.batch_size
    for start in range(0, len(todo), batch):
        index = todo[start : start + batch]
        images = []
        for i in index:
            try:
                images.append(load_image(*job.manifest.path_of(int(i))).convert("RGB"))
            except Exception:  # noqa: BLE001 - an unreadable image fails later, in the reader, with its error
                images.append(Image.new("RGB", (job.backbone.input.size,) * 2))
        store.write_captions(captioner.key, rows[index], captioner.caption(images), captioner.info)
    return captioner.key


def job_prompts(job: Job, store: FeatureStore, rows: np.ndarray, caption_key: str | None) -> list[str] | None:
    if not job.backbone.conditional:
        return None
    captions = None
    if caption_key is not None:
        text, done = store.captions(caption_key)
        if not done[rows].all():
            raise ValueError(f"captions {caption_key} are missing for {int((~done[rows]).sum())} images of this run")
        captions = text[rows].tolist()
    tags = image_tags(job.prompt, job.manifest) if job.prompt.kind == "tags" else None
    return prompts_for(job.prompt, job.manifest.ids, job.manifest.class_names, captions, tags)


def prompt_provenance(backbone: Backbone, prompts: list[str]) -> dict[str, int]:
    """{"context_tokens", "truncated"}: the text encoder's context and how many images' prompts
    are longer and cut to it; warns with one line on stderr when any is."""
    context, truncated = backbone.truncated_prompts(prompts)
    if truncated:
        print(f"warning: {truncated:,} of {len(prompts):,} prompts are longer than {backbone.name}'s "
              f"{context}-token context and are cut to it (recorded in the run's provenance)", file=sys.stderr)
    return {"context_tokens": context, "truncated": truncated}


# -- the chunk loop -----------------------------------------------------------------------------

def compute_chunk(
    job: Job, chunk: Chunk, rows: slice, on_batch: Callable[[int], None] = lambda n: None,
    seconds: dict[str, float] | None = None,
) -> tuple[dict[tuple[int | None, str], np.ndarray], dict[tuple[int | None, str], int]]:
    """Mapper: every (t, block) of one chunk of rows, (n, C, H, W) in the stored dtype, failed rows
    zero; and per (t, block) the inf/NaN values the model computed (counted on the device before
    the cast to the stored dtype, over the rows computed).
    One prepare per batch (its time added to seconds["prepare"]), then one forward per (batch, t)
    and noise draw. With --noise-draws K, draw d of every block goes to [:, d] of (n, K, C, H, W)
    arrays. With --ensemble K, K forwards one after the other (the memory of one) whose
    blocks are summed in float32 and divided by K (DIFT's ensemble, Tang et al. 2023,
    src/models/dift_sd.py: the mean over independent noise draws of the same image); inf/NaN of
    any draw carries into that mean, so it is counted there."""
    cfg, backbone = job.cfg, job.backbone
    ids = job.manifest.ids[rows]
    prompts = job.prompts[rows] if job.prompts is not None else None
    ok = np.flatnonzero(~chunk.failed)
    shapes = job.shapes
    per_row = (cfg.noise_draws,) if cfg.noise_draws > 1 else ()
    out = {(t, b): np.zeros((len(ids), *per_row, *shapes[b]), dtype=cfg.dtype)
           for t in job.timesteps for b in job.blocks}
    nonfinite: dict[tuple[int | None, str], torch.Tensor] = {}  # device scalars, read once at the end
    device = torch.device(cfg.device)
    for start in range(0, len(ok), cfg.batch_size):
        batch = ok[start : start + cfg.batch_size]
        copies: list[tuple[tuple[int | None, str], tuple, torch.Tensor]] = []  # (t, block), where in out, values
        with torch.inference_mode(), autocast(device, cfg.autocast):
            tic = time.perf_counter()
            pixels = torch.from_numpy(chunk.pixels[batch]).to(device)
            prepared = backbone.prepare(pixels, [prompts[i] for i in batch] if prompts is not None else None)
            if seconds is not None:
                seconds["prepare"] = seconds.get("prepare", 0.0) + time.perf_counter() - tic
            for t, draws in model_inputs(job, prepared, [ids[i] for i in batch]):
                t_batch = None if t is None else torch.full((len(batch),), t, device=device, dtype=torch.long)
                sums: dict[str, torch.Tensor] = {}
                for d, x_t in enumerate(draws):
                    for block, h in backbone.forward_blocks(x_t, t_batch, job.blocks, prepared.cond).items():
                        if block in job.pool:
                            h = F.adaptive_avg_pool2d(h, job.pool[block])  # on the device, before the copy
                        if per_row:  # stored draw by draw
                            nonfinite[(t, block)] = nonfinite.get((t, block), 0) + h.numel() - torch.isfinite(h).sum()
                            copies.append(((t, block), (batch, d), to_host(h.to(DTYPES[cfg.dtype]))))
                        else:
                            sums[block] = h.float() if block not in sums else sums[block] + h.float()
                for block, total in sums.items():
                    h = total / len(draws)  # exact for one draw: the block as computed
                    nonfinite[(t, block)] = nonfinite.get((t, block), 0) + h.numel() - torch.isfinite(h).sum()
                    copies.append(((t, block), (batch,), to_host(h.to(DTYPES[cfg.dtype]))))
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # the copies ran while later forwards did
        for key, where, host in copies:
            out[key][where] = host.numpy()
        on_batch(len(batch))
    return out, {key: int(count) for key, count in nonfinite.items()}


def to_host(h: torch.Tensor) -> torch.Tensor:
    """Start the copy to pinned host memory without waiting (CUDA); a plain copy elsewhere."""
    if h.device.type != "cuda":
        return h.cpu()
    host = torch.empty(h.shape, dtype=h.dtype, pin_memory=True)
    return host.copy_(h, non_blocking=True)


def autocast(device: torch.device, precision: str):
    """bf16/fp16 autocast on CUDA; full precision (a no-op context) elsewhere."""
    if precision == "none":
        return contextlib.nullcontext()
    if device.type != "cuda":
        raise ValueError(f"--autocast {precision} needs a CUDA device; on {device.type} use --autocast none")
    return torch.autocast("cuda", dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])


def model_inputs(job: Job, prepared, ids: list[str]):
    """(t, model inputs) for every timestep of the job: the backbone's `add_noise` of each noise draw
    0..K-1 (K: --ensemble or --noise-draws), or the one DDIM inversion or clean input."""
    cfg, backbone = job.cfg, job.backbone
    if backbone.timestep_free:
        yield None, [prepared.x0]
        return
    if cfg.noise == "ddim-inversion":
        for t, x_t in ddim_invert(prepared.x0, job.timesteps, guided_eps(backbone, prepared.cond, cfg.guidance_scale),
                                  backbone.alphas_cumprod(), cfg.ddim_steps).items():
            yield t, [x_t]
        return
    for t in job.timesteps:
        if cfg.noise == "none":
            yield t, [prepared.x0]
        else:
            yield t, [backbone.add_noise(prepared.x0, batch_eps(ids, t, cfg.seed, prepared.x0.shape[1:], draw), t)
                      for draw in range(max(cfg.ensemble, cfg.noise_draws))]


def guided_eps(backbone: Backbone, cond: torch.Tensor | None, scale: float):
    """eps(x, t) under the conditioning, with classifier-free guidance when scale != 1."""
    if cond is None or scale == 1.0:
        return lambda x, t: backbone.predict_eps(x, t, cond)
    uncond = backbone.encode_prompts([""]).expand_as(cond)

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        e_uncond, e_cond = backbone.predict_eps(x, t, uncond), backbone.predict_eps(x, t, cond)
        return e_uncond + scale * (e_cond - e_uncond)

    return eps


def run_chunks(job: Job, run: WritableRun, todo: Sequence[int],
               wait_for_claims: bool = False) -> tuple[dict[str, float], list[int]]:
    """Read ahead one chunk, compute the current one, write the previous one in the background.

    Each chunk is claimed first (`WritableRun.claims`): a chunk that another process extracting the same
    spec holds is skipped, or with `wait_for_claims` waited for (then skipped when that process
    wrote it, computed when it died first). Returns (seconds per phase, the chunks written here)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    seconds = {"read": 0.0, "compute": 0.0, "prepare": 0.0, "write": 0.0, "total": 0.0}  # prepare is part of compute
    written: list[int] = []
    if not todo:
        return seconds, written
    begin = time.perf_counter()
    n_t = len(job.timesteps)
    progress = Progress(
        TextColumn("[bold]extract[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        disable=not job.cfg.progress,
    )
    total = sum(run.chunk_len(c) for c in todo)
    already = f", {len(run) - total:,} already done" if total < len(run) else ""
    task = progress.add_task(f"{run.run_id} ({n_t} t x {len(job.blocks)} blocks{already})", total=total, rate="")

    def advance(n: int) -> None:
        progress.advance(task, n)
        speed = progress.tasks[task].completed / (time.perf_counter() - begin)
        progress.update(task, rate=f"{speed:.1f} img/s ({speed * n_t:.1f} img*t/s)")

    def read(c: int) -> Chunk | None:
        if not claims.take(c, wait=wait_for_claims):
            return None  # another process extracting this spec has it, or has written it
        s = run.chunk_slice(c)
        return read_chunk(job.manifest, range(s.start, s.stop), job.backbone.input, decoders, job.cfg.resize)

    with (run.claims() as claims, ThreadPoolExecutor(4) as decoders, ThreadPoolExecutor(1) as reader,
          ThreadPoolExecutor(1) as writer, progress):
        next_chunk: Future = reader.submit(read, todo[0])
        last_write: Future | None = None
        for k, c in enumerate(todo):
            tic = time.perf_counter()
            chunk = next_chunk.result()
            if k + 1 < len(todo):
                next_chunk = reader.submit(read, todo[k + 1])
            seconds["read"] += time.perf_counter() - tic
            if chunk is None:
                progress.update(task, total=progress.tasks[task].total - run.chunk_len(c))
                continue

            tic = time.perf_counter()
            features, nonfinite = compute_chunk(job, chunk, run.chunk_slice(c), advance, seconds)
            seconds["compute"] += time.perf_counter() - tic

            tic = time.perf_counter()
            if last_write is not None:
                last_write.result()  # at most one chunk waits in memory for the disk
            last_write = writer.submit(run.write_chunk, c, features, chunk.failed, chunk.errors, nonfinite)
            last_write.add_done_callback(lambda _, c=c: claims.release(c))
            written.append(c)
            seconds["write"] += time.perf_counter() - tic
        tic = time.perf_counter()
        if last_write is not None:
            last_write.result()
        seconds["write"] += time.perf_counter() - tic
    seconds["total"] = time.perf_counter() - begin
    return seconds, written


# -- checks -------------------------------------------------------------------------------------

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
    outside = manifest.outside_root()
    if outside:
        raise ManifestError(
            f"{len(outside)} files of {manifest.name!r} are symbolic links (or under one) that lead outside the "
            f"root {manifest.root}, refused like a '..' path: {', '.join(map(repr, outside[:5]))}"
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


def _check_options(cfg: ExtractConfig, backbone: Backbone, prompt: PromptSource) -> None:
    if cfg.noise not in NOISE_MODES:
        raise ValueError(f"--noise {cfg.noise!r} is not available; use one of {', '.join(NOISE_MODES)}")
    if cfg.ensemble < 1:
        raise ValueError(f"--ensemble must be at least 1, not {cfg.ensemble}")
    if cfg.ensemble > 1 and (backbone.timestep_free or cfg.noise != "ddpm"):
        what = f"{backbone.name} takes no noise" if backbone.timestep_free else f"--noise {cfg.noise} is deterministic"
        raise ValueError(f"--ensemble averages random noise draws, but {what}: every draw would be the same; "
                         "drop --ensemble")
    if cfg.noise_draws < 1:
        raise ValueError(f"--noise-draws must be at least 1, not {cfg.noise_draws}")
    if cfg.noise_draws > 1 and cfg.ensemble > 1:
        raise ValueError("--noise-draws stores every draw and --ensemble their mean: give one of them (the mean of "
                         "--noise-draws K is read with --draws mean)")
    if cfg.noise_draws > 1 and (backbone.timestep_free or cfg.noise != "ddpm"):
        what = f"{backbone.name} takes no noise" if backbone.timestep_free else f"--noise {cfg.noise} is deterministic"
        raise ValueError(f"--noise-draws stores random noise draws, but {what}: every draw would be the same; "
                         "drop --noise-draws")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, not {cfg.dtype!r}")
    feature_codec(cfg.codec, cfg.dtype)  # ValueError for an unknown codec or a K out of range
    if cfg.resize not in RESIZES:
        raise ValueError(f"--resize must be one of {', '.join(RESIZES)}, not {cfg.resize!r}")
    if prompt.kind != "null" and not backbone.conditional:
        raise ValueError(f"{backbone.name} is unconditional: it takes no prompt (use --prompt null)")
    if cfg.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    if cfg.chunk_rows is not None and cfg.chunk_rows < 1:
        raise ValueError("--chunk-rows must be at least 1")
    if cfg.noise == "ddim-inversion" and cfg.ddim_steps < 1:
        raise ValueError("--ddim-steps must be at least 1")
    if cfg.noise == "ddim-inversion" and not backbone.timestep_free:
        backbone.alphas_cumprod()  # DDIM needs alpha-bar: a flow-matching backbone refuses here, in one line
    if cfg.guidance_scale != 1.0 and not (backbone.conditional and cfg.noise == "ddim-inversion"):
        raise ValueError("--guidance-scale applies to ddim-inversion with a conditional backbone only")
    if cfg.workers is not None and cfg.scheduler is not None:
        raise ValueError("give --workers N (a local cluster) or --scheduler ADDRESS, not both")
    if cfg.workers is not None and cfg.workers < 1:
        raise ValueError("--workers must be at least 1")
    if cfg.warmup_images < 1:
        raise ValueError("--warmup-images must be at least 1")
