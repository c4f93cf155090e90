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
            "timesteps": None if self.timestep_free else int(self.alphas_cumprod().shape[0]),
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


RANDOM = "random"  # --weights random: seeded random init, for shapes and speed work
META = "meta"  # no storage at all: enough for the block table and the parameter count


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
    if weights is not None and str(weights) not in (RANDOM, META):
        weights = Path(weights)
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
