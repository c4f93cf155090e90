"""The model input at timestep t: q_sample with a deterministic eps per (seed, image id, t, draw),
deterministic DDIM inversion, or the clean input.

The eps of an image depends only on (seed, image id, t, draw) -- never on batch order, batch size,
worker count or device -- so every run of a spec writes bit-identical arrays. Draw 0 is the one
noise of a plain run; draws 1.. are further independent draws (`--ensemble K` averages draws 0..K-1,
`--noise-draws K` stores each of them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t per sample) -> eps

NOISE_MODES = ("ddpm", "ddim-inversion", "none")


def image_eps(seed: int, image_id: str, t: int, shape: Sequence[int], draw: int = 0) -> torch.Tensor:
    """Standard normal noise (float32, `shape`) for one image at one timestep, drawn on the CPU
    from its own stream, keyed by sha256 of (seed, image id, t) for draw 0 (the stream every run
    used before draws existed) and of (seed, image id, t, draw) for draw > 0."""
    if draw < 0:
        raise ValueError(f"a noise draw is a non-negative integer, not {draw}")
    text = f"{seed}\x00{image_id}\x00{t}" + (f"\x00{draw}" if draw else "")
    key = hashlib.sha256(text.encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & ((1 << 63) - 1))
    return torch.randn(tuple(shape), generator=generator)


def batch_eps(image_ids: Sequence[str], t: int, seed: int, shape: Sequence[int], draw: int = 0) -> torch.Tensor:
    """(n, *shape) float32: `image_eps` of each image, stacked in the order of `image_ids`."""
    return torch.stack([image_eps(seed, i, t, shape, draw) for i in image_ids])


def vp_noise(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """sqrt(a_t) x0 + sqrt(1 - a_t) eps: the variance-preserving forward process (DDPM, Ho et al.
    2020, eq. 4), in the dtype and device of x0."""
    alpha_bar = alpha_bar.to(x0.device, x0.dtype)
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps.to(x0.device, x0.dtype)


def q_sample(x0: torch.Tensor, image_ids: Sequence[str], t: int, seed: int, alphas_cumprod: torch.Tensor,
             draw: int = 0) -> torch.Tensor:
    """sqrt(a_t) x0 + sqrt(1 - a_t) eps, with each image's own deterministic eps of `draw`."""
    return vp_noise(x0, batch_eps(image_ids, t, seed, x0.shape[1:], draw), alphas_cumprod[t])


def ddim_grid(timesteps: Sequence[int], steps: int) -> list[int]:
    """0, then `steps` even steps up to the largest timestep, with every requested timestep on it."""
    top = max(timesteps)
    even = {round(top * k / steps) for k in range(steps + 1)}
    return sorted(even | set(timesteps) | {0})


def ddim_step(x: torch.Tensor, eps: torch.Tensor, a_from: torch.Tensor, a_to: torch.Tensor) -> torch.Tensor:
    """Move x from noise level a_from to a_to along the deterministic DDIM path of eps."""
    x0_pred = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
    return a_to.sqrt() * x0_pred + (1 - a_to).sqrt() * eps


def ddim_invert(
    x0: torch.Tensor, timesteps: Sequence[int], eps_model: EpsModel, alphas_cumprod: torch.Tensor, steps: int
) -> dict[int, torch.Tensor]:
    """Deterministic DDIM inversion of x0 to every requested timestep along one trajectory."""
    alphas = alphas_cumprod.to(x0.device, torch.float32)
    grid = ddim_grid(timesteps, steps)
    wanted = set(timesteps)
    out = {0: x0} if 0 in wanted else {}
    x = x0.float()
    for t_from, t_to in zip(grid[:-1], grid[1:]):
        eps = eps_model(x.to(x0.dtype), torch.full((len(x),), t_from, device=x.device, dtype=torch.long)).float()
        x = ddim_step(x, eps, alphas[t_from], alphas[t_to])
        if t_to in wanted:
            out[t_to] = x.to(x0.dtype)
    return out


def ddim_reconstruct(
    x_t: torch.Tensor, t: int, eps_model: EpsModel, alphas_cumprod: torch.Tensor, steps: int
) -> torch.Tensor:
    """DDIM sampling from x_t back to t = 0 on the same grid: the inverse of `ddim_invert`."""
    alphas = alphas_cumprod.to(x_t.device, torch.float32)
    grid = ddim_grid([t], steps)
    x = x_t.float()
    for t_from, t_to in zip(grid[:0:-1], grid[-2::-1]):
        eps = eps_model(x.to(x_t.dtype), torch.full((len(x),), t_from, device=x.device, dtype=torch.long)).float()
        x = ddim_step(x, eps, alphas[t_from], alphas[t_to])
    return x.to(x_t.dtype)
