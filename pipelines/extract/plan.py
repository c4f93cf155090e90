"""Before an extraction starts: whether the dataset's images fit the backbone's input, the free
space at the store, and the bytes and seconds a run will take (measured on a warm-up by
`pipelines.extract.runner.warmup`, reported by `featurestore extract --dry-run`).

The input rule: a backbone that takes one channel (ddpm-mnist) sees colour images as their
luminance only. On the README's data that gives features at chance (few-shot top-1 0.14-0.23 on
CIFAR-10, chance 0.1; ZS-SBIR mAP 0.343 on PACS, chance 0.334), so colour images into a grey-only
backbone are refused unless `--allow-mismatch`. A grey image into a colour backbone (its channel
repeated) and any resize (a 256 px sketch into a 28 px model) are what the reader is for, and pass.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_manifests.manifest import Manifest
from data_manifests.sources import load_image
from pipelines.extract.backbone import InputSpec

FIT_SAMPLE = 16  # images decoded, evenly spaced over the manifest, to tell colour from grey
COLOUR_LEVELS = 2.0  # mean over pixels of (largest - smallest channel), of 255, above which an image is colour
RAW_MARGIN = 1.01  # zstd stores an incompressible block raw with a 3-byte header: no chunk grows by 1%


def sample_rows(n: int, k: int) -> np.ndarray:
    """min(k, n) row indices evenly spaced over 0..n-1, first and last included."""
    return np.linspace(0, n - 1, min(k, n)).round().astype(np.int64)


def is_colour(pixels: np.ndarray) -> bool:
    """Whether a decoded image (H, W) or (H, W, 3) uint8 holds colour: the mean over pixels of its
    largest minus smallest channel is over COLOUR_LEVELS (a grey photo saved as RGB JPEG stays
    near 1 from the chroma rounding)."""
    if pixels.ndim == 2:
        return False
    spread = pixels.max(axis=2).astype(np.int16) - pixels.min(axis=2)
    return float(spread.mean()) > COLOUR_LEVELS


def input_mismatch(manifest: Manifest, spec: InputSpec, backbone: str) -> str | None:
    """Why the dataset's images do not fit `spec`, or None. Decodes FIT_SAMPLE evenly spaced
    images (unreadable ones are skipped: the reader records them later); only colour images into
    a one-channel input are a mismatch (see the module docstring)."""
    if spec.channels != 1:
        return None
    rows = sample_rows(len(manifest), FIT_SAMPLE)
    colour = []
    for i in rows:
        try:
            colour.append(is_colour(np.asarray(load_image(*manifest.path_of(int(i))))))
        except Exception:  # noqa: BLE001 - an unreadable image fails later, in the reader, with its error
            continue
    if not any(colour):
        return None
    return (f"{manifest.name!r} holds colour images ({sum(colour)} of {len(colour)} sampled), but {backbone} takes "
            f"{spec.size}x{spec.size} grey input and would see their luminance only; pick a colour backbone "
            "(featurestore backbones list), or pass --allow-mismatch to extract it anyway")


def free_space(store: str) -> tuple[int | None, str]:
    """(free bytes, the folder measured): shutil.disk_usage of the nearest existing folder of a
    local store path; (None, why) for a URL, whose free space is unknown here."""
    url = store.removeprefix("file://")
    if "://" in url:
        return None, f"unknown for a URL store ({url.split('://', 1)[0]}://)"
    folder = Path(url).expanduser().resolve()
    while not folder.is_dir():
        folder = folder.parent
    return shutil.disk_usage(folder).free, str(folder)


def stored_bytes(root: Path, arrays: dict[str, str]) -> tuple[dict[str, int], int]:
    """Bytes of a local store's files: per name of `arrays` (name -> the array's folder under
    root), its chunk files; and every other file of the store (metadata, tables) together."""
    per_array = {name: sum(f.stat().st_size for f in (root / path).rglob("*") if f.is_file() and f.name != "zarr.json")
                 for name, path in arrays.items()}
    total = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    return per_array, total - sum(per_array.values())


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, as du -h)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass
class ArrayPlan:
    """One stored array (t, block): its per-image shape and dtype, bytes per image before the
    codec and as the warm-up measured them after it."""

    key: str  # "t<T>/<block>"
    shape: list[int]  # (C, H, W); (K, C, H, W) for K > 1 noise draws per image
    dtype: str
    raw_bytes_per_image: int
    stored_bytes_per_image: float


@dataclass
class Warmup:
    """The warm-up extraction: how many images, how many of them failed to decode (their rows
    are zeros, left out of the per-image figures), and its seconds per phase (runner.run_chunks)."""

    images: int
    failed: int
    seconds: dict[str, float]

    @property
    def seconds_per_image(self) -> float:
        """Compute and write of one image (all timesteps and blocks); decoding runs beside them."""
        return (self.seconds["compute"] + self.seconds["write"]) / (self.images - self.failed)


@dataclass
class Plan:
    """What `extract --dry-run` prints: the run's arrays, its expected size and time, the free space."""

    store: str
    backbone: str
    dataset: str
    images: int  # of the run
    images_to_extract: int  # not done yet in an existing run of the same spec
    chunk_rows: int
    codecs: list[dict]  # the feature arrays' zarr codecs, as the warm-up run stored them
    arrays: list[ArrayPlan]
    other_bytes: int  # metadata and tables of the warm-up store, added once
    expected_bytes: int  # the run, all images, compressed, plus other_bytes
    expected_bytes_to_write: int  # the images still to extract (plus other_bytes for a new run)
    expected_seconds: float  # the images still to extract, one process
    warmup: Warmup
    free_bytes: int | None
    free_space_at: str  # the folder measured, or why unknown

    @property
    def raw_bytes_per_image(self) -> int:
        return sum(a.raw_bytes_per_image for a in self.arrays)

    @property
    def stored_bytes_per_image(self) -> float:
        return sum(a.stored_bytes_per_image for a in self.arrays)

    @property
    def fits(self) -> bool | None:
        return None if self.free_bytes is None else self.expected_bytes_to_write <= self.free_bytes

    def to_json(self) -> str:
        doc = asdict(self)
        doc["warmup"]["seconds_per_image"] = self.warmup.seconds_per_image
        doc.update(raw_bytes_per_image=self.raw_bytes_per_image, stored_bytes_per_image=self.stored_bytes_per_image,
                   fits=self.fits)
        return json.dumps(doc, indent=2)

    def to_text(self) -> str:
        """The table and summary lines `extract --dry-run` prints."""
        w = self.warmup
        lines = [f"dry run, nothing written: {self.backbone} on {self.dataset}, {self.images:,} images"
                 + (f" ({self.images_to_extract:,} still to extract)" if self.images_to_extract < self.images else "")
                 + f", chunks of {self.chunk_rows} rows",
                 f"{'array':<16} {'[K x] C x H x W':<16} {'dtype':<8} {'raw/image':>11} {'stored/image':>13}"]
        for a in self.arrays:
            lines.append(f"{a.key:<16} {' x '.join(map(str, a.shape)):<16} {a.dtype:<8} "
                         f"{human_bytes(a.raw_bytes_per_image):>11} {human_bytes(a.stored_bytes_per_image):>13}")
        codec = ", ".join(c.get("name", "?") + (f" {c['configuration']}" if c.get("configuration") else "")
                          for c in self.codecs)
        lines += [
            f"{'all ' + str(len(self.arrays)) + ' arrays':<42} {human_bytes(self.raw_bytes_per_image):>11} "
            f"{human_bytes(self.stored_bytes_per_image):>13}   codecs: {codec}",
            f"expected store size: {human_bytes(self.expected_bytes)} ({self.images:,} images x {len(self.arrays)} "
            f"arrays at the stored size measured on {w.images - w.failed} warm-up images)"
            + (f"; {human_bytes(self.expected_bytes_to_write)} still to write"
               if self.images_to_extract < self.images else ""),
            f"expected time: {_duration(self.expected_seconds)} (estimate from {w.images - w.failed} images: "
            f"{w.seconds_per_image * 1e3:.1f} ms per image to compute and write, in one process)",
        ]
        if self.free_bytes is None:
            lines.append(f"free space: {self.free_space_at}")
        else:
            verdict = "fits" if self.fits else "does NOT fit: a real run is refused (--ignore-free-space overrides)"
            lines.append(f"free space: {human_bytes(self.free_bytes)} at {self.free_space_at}: {verdict}")
        if w.failed:
            lines.append(f"{w.failed} of the {w.images} warm-up images failed to decode and are left out of the figures")
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
