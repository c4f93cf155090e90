"""Loading weights: checkpoint files read safely, strict key/shape checks, model folders from a
local path or the local Hugging Face cache (never a download), and the digests runs record."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

RANDOM = "random"  # --weights random: seeded random init, for shapes and speed work
META = "meta"  # no storage at all: enough for the block table and the parameter count


class WeightsError(ValueError):
    """A checkpoint that does not fit the backbone, or cannot be read."""


def materialize(
    build: Callable[[], nn.Module], weights: str | Path | None, default: Path | None, device: str,
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> tuple[nn.Module, str]:
    """Build a module and fill it: META (no storage), RANDOM (seed 0), or a checkpoint loaded
    strictly (`weights`, else `default`); returns the module on `device` and the weights digest.
    `convert` maps a checkpoint's keys onto the module's when the layouts differ by design."""
    if weights == META:
        with torch.device("meta"):
            return build(), META
    if weights == RANDOM:
        torch.manual_seed(0)
        return build().to(device), RANDOM
    path = weights or default
    if path is None:
        raise WeightsError("no default weights for this backbone: pass --weights PATH (or --weights random)")
    module = build()
    state = read_state_dict(Path(path))
    load_strict(module, convert(state) if convert else state, str(path))
    return module.to(device), file_digest(Path(path))


def file_digest(path: Path) -> str:
    """sha256 of a weights file, recorded with every run."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors file, or a .pt/.pth/.th/.bin/.ckpt file with weights_only=True (never
    pickle code). WeightsError in one line for a missing path, a folder, or a file that is not a
    readable checkpoint (the first sentence of the reason, `_reason`)."""
    if path.is_dir():
        raise WeightsError(f"{path} is a folder without a checkpoint: pass the checkpoint file itself "
                           "(.safetensors, .pt, .pth, .th, .bin or .ckpt)")
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - SafetensorError and friends: a corrupt or cut-short file
            raise WeightsError(f"cannot read {path} as a safetensors file: {_reason(exc)}") from exc
    if path.suffix in (".pt", ".pth", ".th", ".bin", ".ckpt"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is the user's input error
            raise WeightsError(f"{path}: not a readable checkpoint ({_reason(exc)})") from exc
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state dict")
        return obj
    raise WeightsError(f"{path}: unknown weights format {path.suffix!r} (use .safetensors, .pt, .pth, .th, .bin or .ckpt)")


def _reason(exc: Exception) -> str:
    """The first sentence of the first non-empty line of a reader's message, its type name when
    there is none. torch's weights-only unpickler opens with a paragraph on the `weights_only`
    default; its reason follows "WeightsUnpickler error:" and is taken instead."""
    text = str(exc).split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0].split(". ", 1)[0].rstrip(".") if lines else type(exc).__name__


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `module` only if keys and shapes match exactly; name the first mismatches."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if items:
            shown = ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")
            problems.append(f"{len(items)} {label}: {shown}")
    if problems:
        raise WeightsError(f"{source} does not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def local_model_folder(weights: str | Path | None, hub_ids: Sequence[str], marker: str,
                       revision: str | None = None) -> Path:
    """The folder of a model: `weights` when it is a folder, else the snapshot of the hub id
    `weights` (or of the first of `hub_ids` present) in the LOCAL Hugging Face cache, found by its
    `marker` file (e.g. unet/config.json). Nothing is ever downloaded; a partial snapshot is fine
    as long as the files the loader needs are there (it checks)."""
    from huggingface_hub import try_to_load_from_cache

    if weights is not None and Path(weights).exists():
        if not Path(weights).is_dir():
            raise WeightsError(f"{weights} is a file: pass a model folder (the layout save_pretrained writes)")
        if revision is not None:
            raise ValueError("revision applies to a hub id in the local cache, not to a folder")
        return Path(weights)
    for repo_id in [str(weights)] if weights is not None else hub_ids:
        try:
            found = try_to_load_from_cache(repo_id, marker, revision=revision)
        except ValueError:  # not a repo id at all, e.g. a folder path that does not exist
            continue
        if isinstance(found, str):
            return Path(found).parents[len(Path(marker).parts) - 1]
    wanted = str(weights) if weights is not None else " or ".join(hub_ids)
    raise WeightsError(
        f"{wanted} is neither a model folder nor in the local Hugging Face cache (nothing is downloaded here). "
        f"Pass --weights FOLDER pointing at a model folder, or fill the cache first (e.g. `hf download {(hub_ids or [wanted])[0]}`)."
    )


def folder_digest(folder: Path, subfolders: Sequence[str] | None = None) -> str:
    """sha256 over the sorted (relative path, file digest) of the weights (*.safetensors, *.bin),
    configs and tokenizer files (*.json, *.txt) under `subfolders` of `folder` (default: all); an
    entry of `subfolders` may also name one file (e.g. model_index.json)."""
    roots = [folder / s for s in subfolders] if subfolders is not None else [folder]
    files = sorted(p for root in roots for p in ([root] if root.is_file() else root.rglob("*"))
                   if p.is_file() and p.suffix in (".safetensors", ".bin", ".json", ".txt"))
    h = hashlib.sha256()
    for path in files:
        h.update(f"{path.relative_to(folder).as_posix()}\x00{file_digest(path)}\n".encode())
    return "sha256:" + h.hexdigest()


def load_pretrained(cls: Any, folder: Path, what: str) -> nn.Module:
    """`cls.from_pretrained(folder)` (diffusers or transformers), refused unless every key and
    shape of the checkpoint matches the model (from_pretrained alone would initialise missing
    weights at random and only warn)."""
    try:
        model, info = cls.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"cannot load the {what} from {folder}: {exc}") from exc
    problems = []
    for label in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(map(str, info.get(label) or ()))
        if keys:
            problems.append(f"{len(keys)} {label.replace('_', ' ')}: {', '.join(keys[:5])}" + (" ..." if len(keys) > 5 else ""))
    if problems:
        raise WeightsError(f"the {what} in {folder} does not fit {cls.__name__}: " + "; ".join(problems))
    return model.eval().requires_grad_(False)
