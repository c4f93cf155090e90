"""The one feature contract every backbone follows, its registry, and strict weight loading.

A backbone declares its input (size, channels, value range) and its blocks (name -> C, H, W) up
front; the store saves that table. `forward_blocks` runs ONE forward at a timestep and returns
every requested block, stopping after the last one it needs.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


class WeightsError(ValueError):
    """A checkpoint that does not fit the backbone, or cannot be read."""


@dataclass(frozen=True)
class InputSpec:
    """What the reader must turn every image into: size x size, channels, values in value_range."""

    size: int
    channels: int
    value_range: tuple[float, float]


class Backbone(ABC):
    """A frozen model whose intermediate blocks are extracted."""

    name: str
    input: InputSpec
    module: nn.Module
    weights_digest: str
    conditional: bool = False  # whether it takes a prompt

    @property
    @abstractmethod
    def blocks(self) -> dict[str, tuple[int, int, int]]:
        """Every block this backbone offers, in forward order, with its (C, H, W)."""

    @abstractmethod
    def alphas_cumprod(self) -> torch.Tensor:
        """The training noise schedule, indexed by integer timestep (alpha-bar)."""

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Work done once per image, not per timestep (e.g. a VAE encode). Pixel models: identity."""
        return images

    @abstractmethod
    def forward_blocks(self, x_t: torch.Tensor, t: torch.Tensor, blocks: Sequence[str]) -> dict[str, torch.Tensor]:
        """One forward of the noisy input at integer timesteps t, stopping after the last block asked."""

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
            "timesteps": int(self.alphas_cumprod().shape[0]),
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
    """Build a registered backbone, in eval mode, frozen, on `device`."""
    _import_backbones()
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    backbone = _REGISTRY[name].factory(weights=Path(weights) if weights else None, config=config, device=device)
    backbone.module.eval().requires_grad_(False)
    return backbone


def _import_backbones() -> None:
    """Import every backbone file so its @register_backbone runs (heavy imports stay inside them)."""
    from pipelines.extract import backbones  # noqa: F401


# -- weights ----------------------------------------------------------------------------------

def file_digest(path: Path) -> str:
    """sha256 of a weights file, recorded with every run."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors file, or a .pt/.pth/.th file with weights_only=True (never pickle code)."""
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in (".pt", ".pth", ".th", ".bin", ".ckpt"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is the user's input error
            raise WeightsError(f"cannot read {path} as a weights-only torch checkpoint: {exc}") from exc
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state dict")
        return obj
    raise WeightsError(f"{path}: unknown weights format {path.suffix!r} (use .safetensors, .pt, .pth or .th)")


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
