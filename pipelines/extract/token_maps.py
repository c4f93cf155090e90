"""What the diffusers transformer backbones (`dit`, `pixart`, `sd3`, `flux`) share: blocks that are
token sequences turned into (C, H, W) maps, one hooked forward that stops after the last requested
block, VAE latents, the flow-matching noise of SD3 and FLUX, and strict loading of model folders.

A transformer block's output is (B, h·w, C) image tokens in row-major patch order (diffusers'
PatchEmbed flattens its strided convolution's (h, w) grid; FLUX packs 2x2 latent patches row by
row): `tokens_to_map` reshapes them to (B, C, h, w). Joint-attention blocks (SD3's MMDiT, FLUX)
return (text tokens, image tokens); only the image tokens are kept.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines.extract.backbone import Backbone, InputSpec, Prepared
from pipelines.extract.hooks import capture
from pipelines.extract.weights import META, RANDOM, WeightsError, folder_digest, load_pretrained

VAE_FACTOR = 8  # every VAE here downsamples 3 times (RANDOM/META have no VAE to ask)
CLIP_TOKENS = 77


def tokens_to_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, height·width, C) row-major tokens -> (B, C, height, width), same dtype and device."""
    if tokens.shape[1] != height * width:
        raise ValueError(f"{tokens.shape[1]} tokens do not make a {height}x{width} map")
    return tokens.unflatten(1, (height, width)).permute(0, 3, 1, 2)


def parse_options(name: str, config: dict | None, options: dict[str, tuple[type, Any]]) -> dict[str, Any]:
    """--backbone-config of `name` over `options` (key -> (type, default)): unknown keys and values
    of another type (an int is a float; a bool is neither) refused in one line."""
    unknown = sorted(set(config or {}) - set(options))
    if unknown:
        raise ValueError(f"{name} --backbone-config: unknown keys {unknown}; known: {sorted(options)}")
    values = {key: default for key, (_, default) in options.items()}
    for key, value in (config or {}).items():
        kind = options[key][0]
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
            raise ValueError(f"{name} --backbone-config {key} must be a {kind.__name__}, got {value!r}")
        values[key] = value
    return values


def pack_rows(tokens: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """(B, L, D) tokens and a (B, d <= D) vector (a pooled embedding, a token mask) as one
    (B, L + 1, D) conditioning tensor: the vector, zero-padded, is the last row."""
    if vector.shape[-1] > tokens.shape[-1]:
        raise ValueError(f"a {vector.shape[-1]}-wide vector does not fit a row of {tokens.shape[-1]}-wide tokens")
    row = torch.nn.functional.pad(vector.to(tokens.dtype), (0, tokens.shape[-1] - vector.shape[-1]))
    return torch.cat([tokens, row[:, None]], 1)


def unpack_rows(cond: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `pack_rows`: ((B, L, D) tokens, (B, width) vector)."""
    return cond[:, :-1], cond[:, -1, :width]


@dataclass(frozen=True)
class TokenBlock:
    """A transformer block: its store name, module path, and which element of its tuple output
    holds the image tokens (0 for a block returning one tensor)."""

    name: str
    path: str
    element: int = 0


class TransformerBackbone(Backbone):
    """A diffusers transformer on VAE latents. Subclasses give the layout, `encode_prompts`,
    `truncated_prompts` and `_call` (one forward of the module on x_t, t and the conditioning)."""

    conditional = True
    default_timesteps = (200,)
    components: tuple[str, ...] = ()  # the text parts, for error messages

    def __init__(self, module: nn.Module, layout: Sequence[TokenBlock], image_size: int | None, patch: int,
                 weights_digest: str, vae: nn.Module | None = None):
        """`image_size` None: the size the transformer was trained at (its sample_size in latents)."""
        self.module, self.vae = module, vae
        self.weights_digest = weights_digest
        factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else VAE_FACTOR
        image_size = image_size or module.config.sample_size * factor
        self.input = InputSpec(size=image_size, channels=3, value_range=(-1.0, 1.0))
        if image_size % (factor * patch):
            raise ValueError(f"{self.name} image_size must be a multiple of {factor * patch} "
                             f"(VAE factor {factor} x patch {patch}), got {image_size}")
        self.latent_size = image_size // factor
        self.grid = self.latent_size // patch
        self._layout = list(layout)
        self._width = module.config.num_attention_heads * module.config.attention_head_dim

    @property
    def blocks(self) -> dict[str, tuple[int, int, int]]:
        return {b.name: (self._width, self.grid, self.grid) for b in self._layout}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(),
                "parameters_note": "transformer only: the VAE and the text encoders are not counted"}

    def prepare(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> Prepared:
        """VAE latents ((mean − shift_factor)·scaling_factor: the MEAN of the latent distribution,
        as sd15) and the conditioning of each image's prompt, each distinct prompt encoded once;
        no prompt = "" (the unconditional one)."""
        vae = self.part(self.vae, "VAE")
        prompts = [""] * len(images) if prompts is None else list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = (vae.encode(images).latent_dist.mean - shift) * vae.config.scaling_factor
        position = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        cond = self.encode_prompts(list(position))[[position[p] for p in prompts]]
        return Prepared(latents, cond)

    def forward_blocks(
        self, x_t: torch.Tensor, t: torch.Tensor, blocks: Sequence[str], cond: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Every requested block as (B, C, h, w) image-token maps from ONE forward at integer
        timesteps t, stopped after the last block needed. No conditioning = the empty prompt."""
        unknown = [b for b in blocks if b not in self.blocks]
        if unknown or not blocks:
            raise ValueError(f"{self.name} has no block {unknown}; blocks: {list(self.blocks)}")
        if cond is None:
            empty = self.encode_prompts([""])
            cond = empty.expand(len(x_t), *empty.shape[1:])
        needed = [b for b in self._layout if b.name in set(blocks)]
        with capture(self.module, {b.name: b.path for b in needed}, stop_after=needed[-1].name,
                     element={b.name: b.element for b in needed}) as tokens:
            self._call(x_t, t, cond)
        return {name: tokens_to_map(tokens[name], self.grid, self.grid) for name in blocks}

    def _call(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> Any:
        """One forward of the module on the latents x_t at integer timesteps t under `cond`."""
        raise NotImplementedError

    def part(self, module: Any, what: str) -> Any:
        """A component only a model folder has; refused in one line for RANDOM/META builds."""
        if module is None:
            raise ValueError(f"{self.name} built with --weights random/meta has only its transformer: "
                             f"the {what} needs a model folder (--weights FOLDER)")
        return module

    def count_cut(self, tokenizer: Any, prompts: Sequence[str], length: int) -> int:
        """How many of `prompts` have more than `length` tokens (special tokens included), each
        distinct prompt tokenized once."""
        distinct = list(dict.fromkeys(prompts))
        ids = self.part(tokenizer, "tokenizer")(distinct, truncation=False, verbose=False).input_ids
        cut = {p for p, tokens in zip(distinct, ids) if len(tokens) > length}
        return sum(p in cut for p in prompts)


class FlowMatchingBackbone(TransformerBackbone):
    """Rectified-flow noising (SD3, FLUX; Esser et al. 2024, eq. 2 with the rectified-flow
    a_t = 1 − t, b_t = t): x_t = (1 − σ)·x0 + σ·ε. diffusers' FlowMatchEulerDiscreteScheduler sets
    its timesteps to sigmas·num_train_timesteps, so integer t is σ = t / num_train_timesteps; its
    `shift` (σ' = shift·σ / (1 + (shift − 1)·σ)) moves the σ grid a sampler visits and does NOT
    enter this t -> σ map; it is recorded in `noise_process`."""

    def __init__(self, *args: Any, schedule: dict[str, Any], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.schedule = schedule

    @property
    def num_timesteps(self) -> int:
        return int(self.schedule["num_train_timesteps"])

    def sigma(self, t: int | torch.Tensor) -> float | torch.Tensor:
        """σ = t / num_train_timesteps (the scheduler's timesteps = sigmas·num_train_timesteps)."""
        return t / self.num_timesteps

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        sigma = self.sigma(t)
        return (1 - sigma) * x0 + sigma * eps.to(x0.device, x0.dtype)

    @property
    def noise_process(self) -> str:
        s, n = self.schedule, self.num_timesteps
        if s.get("use_dynamic_shifting"):
            shift = (f"dynamic shift (mu from the image token count, base_shift {s['base_shift']}, "
                     f"max_shift {s['max_shift']})")
        else:
            shift = f"shift {s['shift']}"
        return (f"flow matching (rectified flow): x_t = (1 − σ)·x0 + σ·eps, t = {n}·σ (σ = t/{n}; "
                f"the scheduler's {shift} moves its sampling grid and is not applied to this map)")

    def alphas_cumprod(self) -> torch.Tensor:
        raise ValueError(f"{self.name} is a flow-matching model with no alpha-bar schedule: --noise ddim-inversion "
                         "is not implemented for it (use --noise ddpm, which noises as the flow does, or none)")


# -- building and loading ------------------------------------------------------------------------

def build_module(cls: Any, config: dict[str, Any], weights: str, device: str) -> nn.Module:
    """`cls(**config)` on the meta device (META: no storage) or with seed-0 random weights (RANDOM)."""
    if weights == META:
        with torch.device("meta"):
            return cls(**config)
    if weights == RANDOM:
        torch.manual_seed(0)
        return cls(**config).to(device)
    raise ValueError(f"build_module takes {META!r} or {RANDOM!r}, not {weights!r}")


def require_parts(folder: Path, name: str, required: Sequence[str]) -> None:
    """Refuse in one line a folder without every subfolder in `required`."""
    missing = [c for c in required if not (folder / c).is_dir()]
    if missing:
        raise WeightsError(f"{folder} is not a {name} model folder: no {', '.join(c + '/' for c in missing)} "
                           f"(expected {', '.join(c + '/' for c in required)} as save_pretrained "
                           "or the hub layout gives)")


def load_tokenizer(cls: Any, folder: Path, vocab_size: int, exact: bool) -> Any:
    """A tokenizer from `folder`, refused unless its ids fit the text encoder's `vocab_size`
    (`exact`: CLIP's equal sizes; otherwise at most, as T5's 32,100 tokens in a 32,128 table). An
    offline hub load can give a 2-token CLIP tokenizer without raising (ENVIRONMENT.md)."""
    try:
        tokenizer = cls.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise WeightsError(f"cannot load the tokenizer from {folder}: {exc}") from exc
    if len(tokenizer) > vocab_size or (exact and len(tokenizer) != vocab_size):
        raise WeightsError(f"the components in {folder.parent} do not fit together: {folder.name} size = "
                           f"{len(tokenizer)} but its text encoder's vocab_size = {vocab_size}")
    return tokenizer


def load_parts(folder: Path, parts: dict[str, tuple[Any, str]]) -> dict[str, nn.Module]:
    """Each `subfolder: (class, what)` loaded strictly (weights.load_pretrained)."""
    return {sub: load_pretrained(cls, folder / sub, what) for sub, (cls, what) in parts.items()}


def check_fit(folder: Path, pairs: Sequence[tuple[str, Any, str, Any]]) -> None:
    """Refuse in one line components whose (name, value, name, value) pairs disagree."""
    mismatches = [f"{a} = {x} but {b} = {y}" for a, x, b, y in pairs if x != y]
    if mismatches:
        raise WeightsError(f"the components in {folder} do not fit together: " + "; ".join(mismatches))


def scheduler_config(folder: Path | None, defaults: dict[str, Any]) -> dict[str, Any]:
    """`defaults` updated with the same keys of the folder's scheduler/scheduler_config.json, if any."""
    path = folder / "scheduler" / "scheduler_config.json" if folder is not None else None
    if path is None or not path.is_file():
        return dict(defaults)
    saved = json.loads(path.read_text())
    return {k: saved.get(k, v) for k, v in defaults.items()}


def ddpm_alphas_cumprod(schedule: dict[str, Any]) -> torch.Tensor:
    """alpha-bar (float32, num_train_timesteps) of a DDPM-family scheduler config (beta_start,
    beta_end, beta_schedule, num_train_timesteps), as diffusers' DDPMScheduler computes it."""
    from diffusers import DDPMScheduler

    try:
        return DDPMScheduler(**schedule).alphas_cumprod.float()
    except NotImplementedError as exc:  # an unknown beta_schedule
        raise WeightsError(f"unsupported noise schedule {schedule}: {exc}") from exc


def digest(folder: Path, parts: Sequence[str]) -> str:
    """folder_digest over the `parts` (subfolders or files) the folder has, and scheduler/ if present."""
    return folder_digest(folder, [p for p in (*parts, "scheduler") if (folder / p).exists()])
