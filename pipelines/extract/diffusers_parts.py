"""What every diffusers backbone (sd, sdxl, dit, pixart, sd3, flux) shares when it reads its
--backbone-config, loads a model folder's parts, reads the folder's training noise schedule and
encodes prompts: one implementation of each, so every backbone refuses the same inputs the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from pipelines.extract.weights import WeightsError

VAE_FACTOR = 8  # every VAE here downsamples 3 times (RANDOM/META builds have no VAE to ask)
PIXELS = "pixels"  # an option kind: a positive integer number of pixels
PREDICTION_TYPES = ("epsilon", "v_prediction")


def latent_factor(vae: Any) -> int:
    """How many pixels one latent pixel spans: 2^(VAE levels − 1), or VAE_FACTOR without a VAE."""
    return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else VAE_FACTOR


# -- --backbone-config -----------------------------------------------------------------------------

def parse_options(name: str, config: dict | None, options: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    """--backbone-config of `name` over `options` (key -> (kind, default)), the defaults filled in.
    A kind is a type (an int is a float; a bool is neither) or PIXELS (an int > 0). Unknown keys and
    values of another kind are refused in one line (ValueError)."""
    unknown = sorted(set(config or {}) - set(options))
    if unknown:
        raise ValueError(f"{name} --backbone-config: unknown keys {unknown}; known: {sorted(options)}")
    values = {key: default for key, (_, default) in options.items()}
    for key, value in (config or {}).items():
        kind = options[key][0]
        if kind == PIXELS:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} {key} must be a positive integer (pixels), got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
            raise ValueError(f"{name} --backbone-config {key} must be a {kind.__name__}, got {value!r}")
        values[key] = value
    return values


def check_prediction_type(name: str, prediction_type: str | None, allowed: Sequence[str] = PREDICTION_TYPES) -> None:
    """Refuse in one line a prediction type (None: not given) outside `allowed`."""
    if prediction_type is not None and prediction_type not in allowed:
        raise ValueError(f"{name}: prediction_type {prediction_type!r} is not supported ({' or '.join(allowed)})")


# -- model folders ---------------------------------------------------------------------------------

def require_parts(folder: Path, kind: str, required: Sequence[str]) -> None:
    """Refuse in one line a folder without every subfolder in `required` (`kind` with its article:
    "a DiT", "an SDXL")."""
    missing = [c for c in required if not (folder / c).is_dir()]
    if missing:
        raise WeightsError(f"{folder} is not {kind} model folder: no {', '.join(c + '/' for c in missing)} "
                           f"(expected {', '.join(c + '/' for c in required)} and optionally scheduler/, "
                           "as save_pretrained or the hub layout gives)")


def load_tokenizer(cls: Any, folder: Path, vocab_size: int, exact: bool) -> Any:
    """A tokenizer from `folder` (tokenizer, tokenizer_2, ...), refused unless its ids fit the
    matching text encoder's `vocab_size` (`exact`: CLIP's equal sizes; otherwise at most, as T5's
    32,100 tokens in a 32,128 table). An offline hub load can give a 2-token CLIP tokenizer
    without raising (ENVIRONMENT.md)."""
    try:
        tokenizer = cls.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise WeightsError(f"cannot load the tokenizer from {folder}: {exc}") from exc
    if len(tokenizer) > vocab_size or (exact and len(tokenizer) != vocab_size):
        raise WeightsError(f"the components in {folder.parent} do not fit together: {folder.name} size = "
                           f"{len(tokenizer)} but {folder.name.replace('tokenizer', 'text_encoder')} vocab_size = "
                           f"{vocab_size}")
    return tokenizer


def check_fit(folder: Path, pairs: Sequence[tuple[str, Any, str, Any]]) -> None:
    """Refuse components that do not fit together: every (name, value, other name, other value)
    must agree; all disagreements are named in one line."""
    mismatches = [f"{a} = {x} but {b} = {y}" for a, x, b, y in pairs if x != y]
    if mismatches:
        raise WeightsError(f"the components in {folder} do not fit together: " + "; ".join(mismatches))


# -- noise schedules -------------------------------------------------------------------------------

def read_schedule(folder: Path | None, defaults: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The training schedule of a folder (`defaults` overridden by the same keys of its
    scheduler/scheduler_config.json) and the prediction type that config names (None when it names
    none or there is no config: the caller's default decides). A config with `trained_betas` or
    `rescale_betas_zero_snr` is refused: schedules come from beta_start, beta_end, beta_schedule."""
    path = folder / "scheduler" / "scheduler_config.json" if folder is not None else None
    if path is None or not path.is_file():
        return dict(defaults), None
    saved = json.loads(path.read_text())
    for key in ("rescale_betas_zero_snr", "trained_betas"):
        if saved.get(key):
            raise WeightsError(f"{path}: {key} is not supported (betas from beta_start, beta_end, beta_schedule only)")
    return {k: saved.get(k, v) for k, v in defaults.items()}, saved.get("prediction_type")


def alphas_cumprod_from(schedule: dict[str, Any]) -> torch.Tensor:
    """alpha-bar (float32, num_train_timesteps) of a DDPM-family scheduler config, computed in
    float64: betas evenly spaced ("linear", Ho et al. 2020) or evenly spaced in sqrt
    ("scaled_linear", SD's), as diffusers' DDPMScheduler defines them; other schedules refused."""
    n, start, end = schedule["num_train_timesteps"], schedule["beta_start"], schedule["beta_end"]
    if schedule["beta_schedule"] == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    elif schedule["beta_schedule"] == "linear":
        betas = torch.linspace(start, end, n, dtype=torch.float64)
    else:
        raise WeightsError(f"unsupported beta_schedule {schedule['beta_schedule']!r} (scaled_linear or linear)")
    return torch.cumprod(1 - betas, 0).float()


# -- prompts ---------------------------------------------------------------------------------------

def encode_each(encode: Callable[[list[str]], torch.Tensor], prompts: Sequence[str] | None, n: int) -> torch.Tensor:
    """(n, ...) conditioning of n images' prompts (None: n empty prompts), each distinct prompt
    encoded once by `encode`; a prompt count other than n is refused."""
    prompts = [""] * n if prompts is None else list(prompts)
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} images")
    position = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
    return encode(list(position))[[position[p] for p in prompts]]


def count_cut(prompts: Sequence[str], tokenizers: Sequence[Any], length: int) -> int:
    """How many of `prompts` some tokenizer makes longer than `length` tokens (special tokens
    included); each distinct prompt is tokenized once per tokenizer."""
    distinct = list(dict.fromkeys(prompts))
    cut = set()
    for tokenizer in tokenizers:
        ids = tokenizer(distinct, truncation=False, verbose=False).input_ids
        cut |= {p for p, tokens in zip(distinct, ids) if len(tokens) > length}
    return sum(p in cut for p in prompts)
