"""`ddpm-mnist`: a real pixel-space DDPM trained on MNIST (James Hughes 2024, MIT).

The denoiser predicts eps from (z_t, t / 1000). Four 7x7 conv + plane-LayerNorm + GELU blocks
(1 -> 16 -> 32 -> 32 -> 16 channels, all 28x28), a time embedding added after the first block,
and a 3x3 conv to eps. Blocks `block0..block3` are the outputs of those four blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from pipelines.extract.backbone import Backbone, InputSpec, register_backbone
from pipelines.extract.weights import materialize

DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "ddpm-mnist" / "ddpm_mnist_epoch400.safetensors"
SIZE = 28
CHANNELS = (1, 16, 32, 32, 16)
TIMESTEPS = 1000


class ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(c_in, c_out, 7, padding=3), nn.LayerNorm((SIZE, SIZE)), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Denoiser(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([ConvBlock(a, b) for a, b in zip(CHANNELS[:-1], CHANNELS[1:])])
        self.blocks.append(nn.Conv2d(CHANNELS[-1], 1, 3, padding=1))
        self.register_buffer("frequencies", torch.zeros(16))
        self.time_embed = nn.Sequential(
            nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(),
            nn.Linear(128, 128), nn.GELU(), nn.Linear(128, CHANNELS[1]),
        )

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        """Embed each distinct timestep once and gather per sample. The matmul then sees the same
        rows whatever else the batch holds (CPU GEMMs round differently for 4 rows than for 32),
        so a sample's features never depend on the batch size."""
        steps, index = torch.unique(t, return_inverse=True)
        tau = (steps.float() / TIMESTEPS)[:, None] * self.frequencies[None, :]
        return self.time_embed(torch.cat([torch.sin(tau), torch.cos(tau) - 1], dim=1))[index]

    def features(self, z: torch.Tensor, t: torch.Tensor, last_block: int = 4):
        """Yield (index, output) of blocks 0..last_block; block 4 is the eps prediction."""
        h = z
        for i, block in enumerate(self.blocks[: last_block + 1]):
            h = block(h)
            yield i, h
            if i == 0:
                h = h + self.embed_time(t)[:, :, None, None]

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps prediction."""
        for _, h in self.features(z, t):
            pass
        return h


class MnistDDPM(nn.Module):
    """The checkpoint's layout: the denoiser under `gt.` plus the schedule `beta_t`, `alpha_t`."""

    def __init__(self):
        super().__init__()
        self.gt = Denoiser()
        self.register_buffer("beta_t", torch.zeros(TIMESTEPS + 1))
        self.register_buffer("alpha_t", torch.zeros(TIMESTEPS + 1))


class DDPMMnistBackbone(Backbone):
    name = "ddpm-mnist"
    input = InputSpec(size=SIZE, channels=1, value_range=(-0.5, 0.5))  # pixel / 255 - 0.5
    default_timesteps = (100,)

    def __init__(self, module: MnistDDPM, weights_digest: str):
        self.module = module
        self.weights_digest = weights_digest

    @property
    def blocks(self) -> dict[str, tuple[int, int, int]]:
        return {f"block{i}": (c, SIZE, SIZE) for i, c in enumerate(CHANNELS[1:])}

    def alphas_cumprod(self) -> torch.Tensor:
        return self.module.alpha_t

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.module.gt(x_t, t)

    def forward_blocks(
        self, x_t: torch.Tensor, t: torch.Tensor, blocks: Sequence[str], cond: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        wanted = {int(b.removeprefix("block")) for b in blocks}
        return {f"block{i}": h for i, h in self.module.gt.features(x_t, t, last_block=max(wanted)) if i in wanted}


@register_backbone("ddpm-mnist", "MNIST pixel DDPM (147k parameters, 28x28 grey), vendored weights; blocks block0..block3")
def build(weights: Path | str | None, config: dict | None, device: str) -> DDPMMnistBackbone:
    if config:
        raise ValueError("ddpm-mnist takes no --backbone-config")
    return DDPMMnistBackbone(*materialize(MnistDDPM, weights, DEFAULT_WEIGHTS, device))
