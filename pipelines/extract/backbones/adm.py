"""`adm` and `adm256-uncond`: the guided-diffusion UNet (ADM, Dhariwal & Nichol 2021), written here.

The module tree and parameter names follow the original (`time_embed`, `input_blocks.N.M`,
`middle_block`, `output_blocks`, `out`) so its released checkpoints load strictly, and the
computation follows it too (float32 GroupNorm, scale-shift norm, legacy or new QKV head order,
ResBlock up/downsampling). `adm` is configured by guided-diffusion's own flags (a JSON dict);
`adm256-uncond` is the released 256x256 unconditional model.

Blocks use the paper's numbering: `b1..bN` = input_blocks, then the middle block, then the
output blocks (b1..b18, b19, b20..b37 at 256 px).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.extract.backbone import Backbone, InputSpec, register_backbone
from pipelines.extract.weights import WeightsError, materialize

NUM_CLASSES = 1000  # ImageNet, for class_cond models
DEFAULT_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
NOISE_SCHEDULES = ("linear", "cosine")
# guided-diffusion flags of sampling and training only: they do not change the network or its eps
IGNORED_FLAGS = ("timestep_respacing", "use_kl", "rescale_learned_sigmas", "batch_size", "num_samples",
                 "clip_denoised", "use_ddim", "predict_xstart", "rescale_timesteps")


# -- flags ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ADMFlags:
    """guided-diffusion's model and diffusion flags, named, typed and defaulted as in its
    `script_util.model_and_diffusion_defaults`, so users can paste the flags they already use."""

    image_size: int = 64
    num_channels: int = 128
    num_res_blocks: int = 2
    num_heads: int = 4
    num_heads_upsample: int = -1  # -1: num_heads
    num_head_channels: int = -1  # -1: use num_heads; else heads = channels // num_head_channels
    attention_resolutions: str = "16,8"
    channel_mult: str = ""  # "": the default for image_size
    dropout: float = 0.0
    class_cond: bool = False
    use_checkpoint: bool = False  # gradient checkpointing: changes no output; ignored
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    use_fp16: bool = False  # converts weights after construction, changes no key or shape; ignored
    use_new_attention_order: bool = False
    learn_sigma: bool = False
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"

    @classmethod
    def from_json(cls, flags: dict[str, Any]) -> ADMFlags:
        """The model flags; sampling-only flags users paste along with them are accepted and
        ignored, and those that change what eps or t mean are refused unless left at default."""
        changes_meaning = {k: flags[k] for k in ("predict_xstart", "rescale_timesteps") if flags.get(k)}
        if changes_meaning:
            raise ValueError(f"ADM flags {changes_meaning} change what the model predicts or takes as t; "
                             "extraction supports the eps-predicting, integer-timestep models only")
        flags = {k: v for k, v in flags.items() if k not in IGNORED_FLAGS}
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(flags) - set(known))
        if unknown:
            raise ValueError(f"unknown ADM flags: {', '.join(unknown)}; known flags: {', '.join(known)}")
        return cls(**flags)

    def __post_init__(self) -> None:
        for f in fields(self):
            value, kind = getattr(self, f.name), type(f.default)
            if not _has_type(value, kind):
                raise ValueError(f"ADM flag {f.name} must be a {kind.__name__}, not {value!r}")
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"noise_schedule must be one of {', '.join(NOISE_SCHEDULES)}, not {self.noise_schedule!r}")
        levels = len(self.mult)
        if self.image_size % 2 ** (levels - 1):
            raise ValueError(f"image_size {self.image_size} does not halve {levels - 1} times")
        self.attention_ds  # noqa: B018 - parse now, so bad flags fail at construction

    @property
    def mult(self) -> tuple[float, ...]:
        """channel_mult as numbers (guided-diffusion parses a given one with int())."""
        if not self.channel_mult:
            if self.image_size not in DEFAULT_CHANNEL_MULT:
                raise ValueError(f"no default channel_mult for image_size {self.image_size}: give channel_mult")
            return DEFAULT_CHANNEL_MULT[self.image_size]
        try:
            return tuple(int(m) for m in self.channel_mult.split(","))
        except ValueError:
            raise ValueError(f"channel_mult must be comma-separated integers, not {self.channel_mult!r}") from None

    @property
    def attention_ds(self) -> tuple[int, ...]:
        """attention_resolutions as downsample rates (image_size // resolution), as the original."""
        try:
            return tuple(self.image_size // int(r) for r in self.attention_resolutions.split(","))
        except (ValueError, ZeroDivisionError):
            raise ValueError(
                f"attention_resolutions must be comma-separated resolutions, not {self.attention_resolutions!r}"
            ) from None

    @property
    def out_channels(self) -> int:
        return 6 if self.learn_sigma else 3


def _has_type(value: Any, kind: type) -> bool:
    """isinstance, except that bools are not ints and ints are floats (JSON writes 0 for 0.0)."""
    if isinstance(value, bool) or kind is bool:
        return isinstance(value, bool) and kind is bool
    return isinstance(value, (int, float) if kind is float else kind)


# The released 256x256 unconditional model (openai/guided-diffusion README, `256x256_diffusion_uncond.pt`).
ADM256_UNCOND_FLAGS: dict[str, Any] = {
    "image_size": 256, "num_channels": 256, "num_res_blocks": 2, "channel_mult": "", "attention_resolutions": "32,16,8",
    "num_head_channels": 64, "num_heads": 4, "num_heads_upsample": -1, "resblock_updown": True, "use_scale_shift_norm": True,
    "learn_sigma": True, "class_cond": False, "dropout": 0.0, "use_new_attention_order": False, "use_fp16": False,
    "diffusion_steps": 1000, "noise_schedule": "linear",
}


def schedule_alphas_cumprod(schedule: str, steps: int) -> torch.Tensor:
    """alpha-bar of guided-diffusion's `get_named_beta_schedule`, computed in float64 like the original."""
    if schedule == "linear":
        scale = 1000 / steps  # keeps the schedule's shape for any number of steps
        betas = np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)
    elif schedule == "cosine":
        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)])
    else:
        raise ValueError(f"unknown noise schedule {schedule!r}; use one of {', '.join(NOISE_SCHEDULES)}")
    return torch.from_numpy(np.cumprod(1.0 - betas)).float()


# -- layers -----------------------------------------------------------------------------------

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps: [cos(t f), sin(t f)], f = max_period^(-i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class GroupNorm32(nn.GroupNorm):
    """32-group norm computed in float32 whatever the input dtype, as the original."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv between levels (ResBlock up paths use no conv)."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample(nn.Module):
    """A strided 3x3 conv between levels, or 2x2 average pooling inside ResBlock down paths."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, timestep embedding added (or as scale-shift of the second norm),
    GroupNorm-SiLU-dropout-conv, plus a skip. `resample` "up"/"down" resizes both paths after the
    first norm, before the first conv (the original's h_upd / x_upd)."""

    def __init__(
        self, channels: int, emb_channels: int, out_channels: int, dropout: float, scale_shift: bool,
        resample: str | None = None,
    ):
        super().__init__()
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        if resample == "up":
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif resample == "down":
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if scale_shift else out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers[2](self.h_upd(self.in_layers[:2](x)))
        x = self.x_upd(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.scale_shift:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class QKVAttention(nn.Module):
    """Multi-head attention on a stacked qkv (B, 3 * heads * ch, T). `new_order` False (the
    original's QKVAttentionLegacy) splits heads first, each head's channels holding its own q, k, v;
    True (QKVAttention) splits q, k, v first, then heads. q and k are each scaled by ch^-1/4."""

    def __init__(self, n_heads: int, new_order: bool):
        super().__init__()
        self.n_heads = n_heads
        self.new_order = new_order

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        if self.new_order:
            q, k, v = (part.reshape(bs * self.n_heads, ch, length) for part in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(bs * self.n_heads, 3 * ch, length).split(ch, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        return torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)


class AttentionBlock(nn.Module):
    """Self-attention over all positions, residual: x + proj_out(attention(qkv(norm(x))))."""

    def __init__(self, channels: int, num_heads: int, num_head_channels: int, new_order: bool):
        super().__init__()
        if num_head_channels != -1:
            if channels % num_head_channels:
                raise ValueError(f"{channels} channels do not split into heads of {num_head_channels}")
            num_heads = channels // num_head_channels
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.attention = QKVAttention(num_heads, new_order)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


class EmbedSequential(nn.Sequential):
    """A sequence of layers where ResBlocks also receive the timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


# -- the UNet ---------------------------------------------------------------------------------

class ADMUNet(nn.Module):
    """guided-diffusion's UNetModel built from `ADMFlags`. `block_shapes` records each block's
    (C, H, W) while the blocks are built, so the table needs no forward."""

    def __init__(self, flags: ADMFlags):
        super().__init__()
        self.flags = flags
        size, model_ch, n_res = flags.image_size, flags.num_channels, flags.num_res_blocks
        emb_ch = 4 * model_ch
        heads_up = flags.num_heads if flags.num_heads_upsample == -1 else flags.num_heads_upsample

        def res(c_in: int, c_out: int, resample: str | None = None) -> ResBlock:
            return ResBlock(c_in, emb_ch, c_out, flags.dropout, flags.use_scale_shift_norm, resample)

        def attention(c: int, heads: int) -> AttentionBlock:
            return AttentionBlock(c, heads, flags.num_head_channels, flags.use_new_attention_order)

        self.time_embed = nn.Sequential(nn.Linear(model_ch, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.label_emb = nn.Embedding(NUM_CLASSES, emb_ch) if flags.class_cond else None

        ch = input_ch = int(flags.mult[0] * model_ch)
        ds = 1
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(3, ch, 3, padding=1))])
        self.block_shapes: list[tuple[int, int, int]] = [(ch, size, size)]
        skip_chans = [ch]
        for level, mult in enumerate(flags.mult):
            for _ in range(n_res):
                layers: list[nn.Module] = [res(ch, int(mult * model_ch))]
                ch = int(mult * model_ch)
                if ds in flags.attention_ds:
                    layers.append(attention(ch, flags.num_heads))
                self.input_blocks.append(EmbedSequential(*layers))
                self.block_shapes.append((ch, size // ds, size // ds))
                skip_chans.append(ch)
            if level != len(flags.mult) - 1:
                down = res(ch, ch, "down") if flags.resblock_updown else Downsample(ch, True)
                self.input_blocks.append(EmbedSequential(down))
                ds *= 2
                self.block_shapes.append((ch, size // ds, size // ds))
                skip_chans.append(ch)

        self.middle_block = EmbedSequential(res(ch, ch), attention(ch, flags.num_heads), res(ch, ch))
        self.block_shapes.append((ch, size // ds, size // ds))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(flags.mult))):
            for i in range(n_res + 1):
                layers = [res(ch + skip_chans.pop(), int(mult * model_ch))]
                ch = int(mult * model_ch)
                if ds in flags.attention_ds:
                    layers.append(attention(ch, heads_up))
                if level and i == n_res:
                    layers.append(res(ch, ch, "up") if flags.resblock_updown else Upsample(ch, True))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))
                self.block_shapes.append((ch, size // ds, size // ds))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(input_ch, flags.out_channels, 3, padding=1))

    def embed(self, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The timestep (+ class) embedding. Each distinct t is embedded once and gathered, so a
        sample's embedding never depends on what else is in the batch (CPU GEMMs round by shape)."""
        steps, index = torch.unique(t, return_inverse=True)
        emb = self.time_embed(timestep_embedding(steps, self.flags.num_channels))[index]
        if self.label_emb is not None:
            if y is None:
                raise ValueError("a class-conditional ADM needs class labels y")
            emb = emb + self.label_emb(y)
        return emb

    def trunk(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """Yield every block's output in order (input blocks, middle block, output blocks); a
        caller that stops iterating runs no further block."""
        emb = self.embed(t, y)
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
            yield h
        h = self.middle_block(h, emb)
        yield h
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            yield h

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The model output: eps (3 channels), followed by the variance interpolation v when learn_sigma."""
        for h in self.trunk(x, t, y):
            pass
        return self.out(h)


# -- the backbone -----------------------------------------------------------------------------

class ADMBackbone(Backbone):
    default_timesteps = (150,)

    def __init__(self, name: str, module: ADMUNet, weights_digest: str):
        self.name = name
        self.module = module
        self.weights_digest = weights_digest
        self.input = InputSpec(size=module.flags.image_size, channels=3, value_range=(-1.0, 1.0))

    @property
    def blocks(self) -> dict[str, tuple[int, int, int]]:
        return {f"b{i}": shape for i, shape in enumerate(self.module.block_shapes, start=1)}

    def alphas_cumprod(self) -> torch.Tensor:
        return schedule_alphas_cumprod(self.module.flags.noise_schedule, self.module.flags.diffusion_steps)

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.module(x_t, t)[:, :3]  # with learn_sigma, channels 3..5 are the variance output

    def forward_blocks(
        self, x_t: torch.Tensor, t: torch.Tensor, blocks: Sequence[str], cond: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        names = list(self.blocks)
        unknown = [b for b in blocks if b not in names]
        if unknown or not blocks:
            raise ValueError(f"{self.name} has blocks b1..b{len(names)}; asked for {list(blocks)}")
        last = max(names.index(b) for b in blocks)
        out = {}
        for i, h in enumerate(self.module.trunk(x_t, t)):
            if names[i] in blocks:
                out[names[i]] = h
            if i == last:
                break
        return out


def _build(name: str, flags: ADMFlags, weights: Path | str | None, device: str, weights_hint: str) -> ADMBackbone:
    """Refuse what extraction cannot run, then build and fill the UNet (see `materialize`)."""
    if flags.class_cond:
        raise ValueError("class-conditional ADM needs labels; not supported for extraction")
    if weights is None:
        raise WeightsError(f"{name} has no default weights: pass --weights PATH to {weights_hint} (or --weights random)")
    return ADMBackbone(name, *materialize(lambda: ADMUNet(flags), weights, default=None, device=device))


@register_backbone("adm", "guided-diffusion UNet (ADM) from its flags: --backbone-config FLAGS.json; blocks b1..bN")
def build(weights: Path | str | None, config: dict | None, device: str) -> ADMBackbone:
    if config is None:
        raise ValueError("adm needs --backbone-config FILE: a JSON object of guided-diffusion flags "
                         '(e.g. {"image_size": 256, "num_channels": 256, ...})')
    return _build("adm", ADMFlags.from_json(config), weights, device,
                     "the guided-diffusion checkpoint these flags describe")


@register_backbone("adm256-uncond", "guided-diffusion 256x256 unconditional ImageNet UNet (553M); blocks b1..b37")
def build_256_uncond(weights: Path | str | None, config: dict | None, device: str) -> ADMBackbone:
    if config is not None:
        raise ValueError("adm256-uncond is a fixed preset and takes no --backbone-config; use backbone adm for other flags")
    return _build("adm256-uncond", ADMFlags.from_json(ADM256_UNCOND_FLAGS), weights, device,
                     "the official 256x256_diffusion_uncond.pt")
