"""What the diffusers transformer backbones (`dit`, `pixart`, `sd3`, `flux`) share: blocks that are
token sequences turned into (C, H, W) maps, one hooked forward that stops after the last requested
block, VAE latents, the DDPM noise of DiT and PixArt, the flow-matching noise of SD3 and FLUX, and
strict loading of model folders (the helpers every diffusers backbone uses are in diffusers_parts).

A transformer block's output is (B, h·w, C) image tokens in row-major patch order (diffusers'
PatchEmbed flattens its strided convolution's (h, w) grid; FLUX packs 2x2 latent patches row by
row): `tokens_to_map` reshapes them to (B, C, h, w). Joint-attention blocks (SD3's MMDiT, FLUX)
return (text tokens, image tokens); only the image tokens are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines.extract.backbone import Backbone, InputSpec, Prepared
from pipelines.extract.diffusers_parts import alphas_cumprod_from, count_cut, encode_each, latent_factor
from pipelines.extract.hooks import capture
from pipelines.extract.weights import META, RANDOM, folder_digest, load_pretrained

CLIP_TOKENS = 77


def tokens_to_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, height·width, C) row-major tokens -> (B, C, height, width), same dtype and device."""
    if tokens.shape[1] != height * width:
        raise ValueError(f"{tokens.shape[1]} tokens do not make a {height}x{width} map")
    return tokens.unflatten(1, (height, width)).permute(0, 3, 1, 2)


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
                 weights_digest: str, vae: nn.Module | None = None, max_sequence_length: int | None = None):
        """`image_size` None: the size the transformer was trained at (its sample_size in latents).
        `max_sequence_length`: the text tokens a prompt is padded or cut to (`self.tokens`), at
        least 1; None for a backbone whose prompt is not tokenized."""
        self.module, self.vae = module, vae
        self.weights_digest = weights_digest
        if max_sequence_length is not None and max_sequence_length < 1:
            raise ValueError(f"{self.name} max_sequence_length must be at least 1, got {max_sequence_length}")
        self.tokens = max_sequence_length
        factor = latent_factor(vae)
        if image_size is None:
            image_size = module.config.sample_size * factor
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
        cond = encode_each(self.encode_prompts, prompts, len(images))
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = (vae.encode(images).latent_dist.mean - shift) * vae.config.scaling_factor
        return Prepared(latents, cond)

    def forward_blocks(
        self, x_t: torch.Tensor, t: torch.Tensor, blocks: Sequence[str], cond: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Every requested block as (B, C, h, w) image-token maps from ONE forward at integer
        timesteps t, stopped after the last block needed. No conditioning = the empty prompt."""
        unknown = [b for b in blocks if b not in self.blocks]
        if unknown or not blocks:
            raise ValueError(f"{self.name} has no block {unknown}; blocks: {list(self.blocks)}")
        needed = [b for b in self._layout if b.name in set(blocks)]
        with capture(self.module, {b.name: b.path for b in needed}, stop_after=needed[-1].name,
                     element={b.name: b.element for b in needed}) as tokens:
            self._call(x_t, t, self._cond(cond, len(x_t)))
        return {name: tokens_to_map(tokens[name], self.grid, self.grid) for name in blocks}

    def _call(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> Any:
        """One forward of the module on the latents x_t at integer timesteps t under `cond` (as
        `encode_prompts` returns it); the module's output."""
        raise NotImplementedError

    def _cond(self, cond: torch.Tensor | None, batch: int) -> torch.Tensor:
        """`cond`, or for None the empty prompt's conditioning repeated `batch` times."""
        if cond is not None:
            return cond
        empty = self.encode_prompts([""])
        return empty.expand(batch, *empty.shape[1:])

    def part(self, module: Any, what: str) -> Any:
        """A component only a model folder has; refused in one line for RANDOM/META builds."""
        if module is None:
            raise ValueError(f"{self.name} built with --weights random/meta has only its transformer: "
                             f"the {what} needs a model folder (--weights FOLDER)")
        return module

    def count_cut(self, tokenizer: Any, prompts: Sequence[str], length: int) -> int:
        """How many of `prompts` have more than `length` tokens (special tokens included), each
        distinct prompt tokenized once (diffusers_parts.count_cut)."""
        return count_cut(prompts, [self.part(tokenizer, "tokenizer")], length)


class DDPMTransformerBackbone(TransformerBackbone):
    """A transformer trained with DDPM noising (DiT, PixArt): its alpha-bar schedule and an output
    whose first in_channels channels are the predicted noise (the rest, the learned variance)."""

    def __init__(self, *args: Any, schedule: dict[str, Any], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._alphas_cumprod = alphas_cumprod_from(schedule)

    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas_cumprod

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The noise eps (n, C, h, w): the first in_channels output channels (learn_sigma models
        also predict the variance); no conditioning = the empty prompt."""
        return self._call(x_t, t, self._cond(cond, len(x_t))).sample[:, : self.module.config.in_channels]


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


def load_parts(folder: Path, parts: dict[str, tuple[Any, str]]) -> dict[str, nn.Module]:
    """Each `subfolder: (class, what)` loaded strictly (weights.load_pretrained)."""
    return {sub: load_pretrained(cls, folder / sub, what) for sub, (cls, what) in parts.items()}


def digest(folder: Path, parts: Sequence[str]) -> str:
    """folder_digest over the `parts` (subfolders or files) the folder has, and scheduler/ if present."""
    return folder_digest(folder, [p for p in (*parts, "scheduler") if (folder / p).exists()])
