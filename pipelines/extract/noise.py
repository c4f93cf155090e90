"""Noising the input to timestep t, deterministically per (seed, image id, t).

The eps of an image depends only on (seed, image id, t) -- never on batch order, batch size,
worker count or device -- so every run of a spec writes bit-identical arrays.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

NOISE_MODES = ("ddpm", "none")


def image_eps(seed: int, image_id: str, t: int, shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise for one image at one timestep, drawn on the CPU from its own stream."""
    key = hashlib.sha256(f"{seed}\x00{image_id}\x00{t}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & ((1 << 63) - 1))
    return torch.randn(tuple(shape), generator=generator)


def noisy_input(
    x0: torch.Tensor, image_ids: Sequence[str], t: int, mode: str, seed: int, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """The model input at timestep t: q_sample of x0 (`ddpm`) or x0 itself (`none`)."""
    if mode == "none":
        return x0
    if mode != "ddpm":
        raise ValueError(f"unknown noise mode {mode!r}; use one of {', '.join(NOISE_MODES)}")
    eps = torch.stack([image_eps(seed, i, t, x0.shape[1:]) for i in image_ids]).to(x0.device, x0.dtype)
    alpha_bar = alphas_cumprod[t].to(x0.device, x0.dtype)
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
