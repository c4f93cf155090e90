"""The one feature contract every backbone follows, its registry, and strict weight loading.

A backbone declares its input (size, channels, value range) and its blocks (name -> C, H, W) up
front; the store saves that table. `forward_blocks` runs ONE forward at a timestep and returns
every requested block, stopping after the last one it needs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines.extract.noise import vp_noise
from pipelines.extract.weights import META, RANDOM


@dataclass(frozen=True)
class InputSpec:
    """What the reader must turn every image into: size x size, channels, values in value_range."""

    size: int
    channels: int
    value_range: tuple[float, float]


@dataclass
class Prepared:
    """What a backbone computes once per image and every timestep shares: the clean input the
    noise is added to (pixels, or VAE latents) and the conditioning (e.g. text embeddings)."""

    x0: torch.Tensor
    cond: torch.Tensor | None = None


class Backbone(ABC):
    """A frozen model whose intermediate blocks are extracted.

    Diffusion backbones are called once per (batch, t) on the noised `Prepared.x0`; a backbone
    with `timestep_free = True` (an expert such as a ResNet) is called once per batch with t = None
    and its arrays are stored under the timestep None.
    """

    name: str
    input: InputSpec
    module: nn.Module
    weights_digest: str
    conditional: bool = False  # takes a prompt: prepare() receives one string per image
    timestep_free: bool = False
    default_timesteps: tuple[int, ...] = ()

    @property
    @abstractmethod
    def blocks(self) -> dict[str, tuple[int, int, int]]:
        """Every block this backbone offers, in forward order, with its (C, H, W)."""

    @property
    def attention_maps(self) -> dict[str, tuple[int, int, int]]:
        """Cross-attention maps offered as extra arrays, `<block>.attn` -> (tokens, H, W)."""
        return {}

    def alphas_cumprod(self) -> torch.Tensor:
        """The training noise schedule, indexed by integer timestep (alpha-bar)."""
        raise NotImplementedError(f"{self.name} has no noise schedule")

    @property
    def num_timesteps(self) -> int:
        """Integer timesteps run 0..num_timesteps-1."""
        return int(self.alphas_cumprod().shape[0])

    @property
    def noise_process(self) -> str:
        """How `add_noise` makes x_t, in words (`backbones show`)."""
        return "variance-preserving (DDPM): x_t = sqrt(alpha_bar_t)·x0 + sqrt(1 − alpha_bar_t)·eps"

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        """x_t of the clean input x0 (n, ...) at integer timestep t with the standard normal eps
        (same shape). Default: the variance-preserving process of `alphas_cumprod`; a flow-matching
        backbone overrides it (x_t = (1 − sigma)·x0 + sigma·eps)."""
        return vp_noise(x0, eps, self.alphas_cumprod()[t])

    def prepare(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> Prepared:
        """Work done once per image, not per timestep (a VAE encode, a text encode)."""
        return Prepared(images)

    @abstractmethod
    def forward_blocks(
        self, x_t: torch.Tensor, t: torch.Tensor | None, blocks: Sequence[str], cond: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """One forward at integer timesteps t (None for timestep-free backbones), returning every
        requested block (and `<block>.attn` map) and stopping after the last one it needs."""

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The model's noise prediction (used by DDIM inversion)."""
        raise NotImplementedError(f"{self.name} does not predict noise")

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Conditioning for prompts (conditional backbones; the empty prompt is the unconditional one)."""
        raise NotImplementedError(f"{self.name} takes no prompt")

    def truncated_prompts(self, prompts: Sequence[str]) -> tuple[int, int]:
        """(context length in tokens, how many of `prompts` are longer and cut to it by encode_prompts)."""
        raise NotImplementedError(f"{self.name} takes no prompt")

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def describe(self) -> dict[str, Any]:
        """The `backbones show --json` document."""
        return {
            "name": self.name,
            "parameters": self.parameters,
            "blocks": {b: list(chw) for b, chw in self.blocks.items()},
            "input": {"size": self.input.size, "channels": self.input.channels,
                      "value_range": list(self.input.value_range)},
            "attention_maps": {b: list(shape) for b, shape in self.attention_maps.items()},
            "timesteps": None if self.timestep_free else self.num_timesteps,
            "noise_process": None if self.timestep_free else self.noise_process,
            "default_timesteps": list(self.default_timesteps),
            "conditional": self.conditional,
            "weights_digest": self.weights_digest,
        }


# -- registry ---------------------------------------------------------------------------------

Factory = Callable[..., Backbone]


@dataclass(frozen=True)
class BackboneEntry:
    name: str
    description: str
    factory: Factory


_REGISTRY: dict[str, BackboneEntry] = {}


def register_backbone(name: str, description: str) -> Callable[[Factory], Factory]:
    """Register `factory(weights: Path | None, config: dict | None, device: str) -> Backbone`."""

    def wrap(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} registered twice")
        _REGISTRY[name] = BackboneEntry(name, description, factory)
        return factory

    return wrap


def list_backbones() -> list[BackboneEntry]:
    _import_backbones()
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


def create_backbone(
    name: str, weights: str | Path | None = None, config: dict | None = None, device: str = "cpu"
) -> Backbone:
    """Build a registered backbone, in eval mode, frozen, on `device`.

    `weights`: a local file or folder, RANDOM, META, or None for the backbone's default
    (vendored weights, or the local Hugging Face cache; never a download).
    """
    _import_backbones()
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    if weights is not None:  # the CLI passes Path("meta") for --weights meta
        weights = str(weights) if str(weights) in (RANDOM, META) else Path(weights)
    backbone = _REGISTRY[name].factory(weights=weights, config=config, device=device)
    backbone.module.eval().requires_grad_(False)
    return backbone


def _import_backbones() -> None:
    """Import every module of pipelines/extract/backbones so each @register_backbone runs: a new
    backbone is one new file there. Heavy imports (diffusers...) stay inside the factories."""
    import importlib
    import pkgutil

    from pipelines.extract import backbones

    for info in pkgutil.iter_modules(backbones.__path__):
        importlib.import_module(f"{backbones.__name__}.{info.name}")


