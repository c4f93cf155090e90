"""`sd15`: Stable Diffusion v1.5 -- diffusers UNet2DConditionModel + AutoencoderKL + CLIP text encoder.

Blocks `down0..down3` (hidden states after each down block's downsampler), `mid`, `up0..up3` are the
outputs of `down_blocks.i`, `mid_block`, `up_blocks.j`; `<block>.attn` is the cross-attention map
(tokens x h x w) of each block that has cross-attention. The forward stops after the last requested
block. Weights: a diffusers model folder (unet/, vae/, text_encoder/, tokenizer/, optional
scheduler/), or a hub id found in the LOCAL Hugging Face cache (never a download), or RANDOM/META
(the UNet alone, built from the v1.5 config below).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines.extract.backbone import Backbone, InputSpec, Prepared, register_backbone
from pipelines.extract.weights import META, RANDOM, WeightsError, folder_digest, load_pretrained, local_model_folder
from pipelines.extract.hooks import capture

HUB_IDS = ("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5")
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer")  # scheduler/ is optional
TOKENS = 77  # CLIP's context: every prompt is padded to it
SD_LATENT_FACTOR = 8  # SD's VAE downsamples 3 times (RANDOM/META have no VAE to ask)

# The released v1.5 unet/config.json, so RANDOM/META need nothing from disk (859,520,964 parameters).
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32, "norm_eps": 1e-5,
    "act_fn": "silu", "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "downsample_padding": 1, "mid_block_scale_factor": 1,
}
# SD's training schedule, used when a folder has no scheduler/scheduler_config.json.
SD_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
}


@dataclass(frozen=True)
class SD15Config:
    """--backbone-config: input size in pixels, which CLIP layer conditions the UNet, hub revision."""

    image_size: int = 512
    text_layer: str = "last"  # or "penultimate": the layer before the last, through the final layer norm
    revision: str | None = None  # of the hub id in the local cache; not for a folder

    @classmethod
    def parse(cls, config: dict | None) -> SD15Config:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config or {}) - known)
        if unknown:
            raise ValueError(f"sd15 --backbone-config: unknown keys {unknown}; known: {sorted(known)}")
        cfg = cls(**(config or {}))
        if cfg.text_layer not in ("last", "penultimate"):
            raise ValueError(f"sd15 text_layer must be 'last' or 'penultimate', got {cfg.text_layer!r}")
        return cfg


@dataclass(frozen=True)
class _Block:
    """A UNet block: its store name, module path, output channels and the spatial size it reads
    (where its attention runs) and writes."""

    name: str
    path: str
    channels: int
    size_in: int
    size_out: int


def block_layout(block_out_channels: Sequence[int], latent_size: int) -> list[_Block]:
    """The blocks in forward order. Every block but the last down block halves the size; every
    block but the last up block doubles it (diffusers' add_downsample / add_upsample)."""
    n = len(block_out_channels)
    layout, size = [], latent_size
    for i, c in enumerate(block_out_channels):
        out = size // 2 if i < n - 1 else size
        layout.append(_Block(f"down{i}", f"down_blocks.{i}", c, size, out))
        size = out
    layout.append(_Block("mid", "mid_block", block_out_channels[-1], size, size))
    for j, c in enumerate(reversed(block_out_channels)):
        out = size * 2 if j < n - 1 else size
        layout.append(_Block(f"up{j}", f"up_blocks.{j}", c, size, out))
        size = out
    return layout


class SD15Backbone(Backbone):
    name = "sd15"
    conditional = True
    default_timesteps = (200,)

    def __init__(self, unet: nn.Module, cfg: SD15Config, weights_digest: str, schedule: dict[str, Any],
                 vae: nn.Module | None = None, text_encoder: nn.Module | None = None, tokenizer: Any = None):
        from diffusers.models.attention_processor import Attention

        self.module = unet
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.cfg = cfg
        self.weights_digest = weights_digest
        self.input = InputSpec(size=cfg.image_size, channels=3, value_range=(-1.0, 1.0))
        self._alphas_cumprod = alphas_cumprod_from(schedule)
        factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else SD_LATENT_FACTOR
        channels = unet.config.block_out_channels
        multiple = factor * 2 ** (len(channels) - 1)  # so every down block halves an even size
        if cfg.image_size % multiple:
            raise ValueError(f"sd15 image_size must be a multiple of {multiple}, got {cfg.image_size}")
        self._layout = block_layout(channels, cfg.image_size // factor)
        self._cross_attention = {
            b.name: [m for m in unet.get_submodule(b.path).modules() if isinstance(m, Attention) and m.is_cross_attention]
            for b in self._layout
        }

    @property
    def blocks(self) -> dict[str, tuple[int, int, int]]:
        return {b.name: (b.channels, b.size_out, b.size_out) for b in self._layout}

    @property
    def attention_maps(self) -> dict[str, tuple[int, int, int]]:
        """Maps at the resolution the block's attention runs at (its input size)."""
        return {f"{b.name}.attn": (TOKENS, b.size_in, b.size_in) for b in self._layout if self._cross_attention[b.name]}

    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas_cumprod

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "parameters_note": "UNet only: the VAE and the CLIP text encoder are not counted"}

    def prepare(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> Prepared:
        """VAE latents (the MEAN of the latent distribution, not a sample: a latent depends on the
        image alone) and text embeddings, each distinct prompt encoded once; no prompt = ""."""
        vae = self._component(self.vae)
        prompts = [""] * len(images) if prompts is None else list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        latents = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
        position = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        cond = self.encode_prompts(list(position))[[position[p] for p in prompts]]
        return Prepared(latents, cond)

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """(len(prompts), 77, D): CLIP's last hidden state, or its penultimate layer's output
        through the final layer norm (`text_layer: penultimate`)."""
        text_encoder, tokenizer = self._component(self.text_encoder), self.tokenizer
        ids = tokenizer(list(prompts), padding="max_length", max_length=TOKENS, truncation=True,
                        return_tensors="pt").input_ids.to(text_encoder.device)
        if self.cfg.text_layer == "last":
            return text_encoder(ids).last_hidden_state
        hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        # transformers 5 keeps the layer norm on the model itself, 4.x under .text_model
        return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)

    def truncated_prompts(self, prompts: Sequence[str]) -> tuple[int, int]:
        """(77, how many prompts have more than 77 tokens, start and end included): encode_prompts
        cuts those. Each distinct prompt is tokenized once."""
        distinct = list(dict.fromkeys(prompts))
        ids = self._component(self.tokenizer)(distinct, truncation=False, verbose=False).input_ids
        cut = {p for p, tokens in zip(distinct, ids) if len(tokens) > TOKENS}
        return TOKENS, sum(p in cut for p in prompts)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), D): CLIP's pooled text embedding (the end-of-text token after the final layer
        norm), the class-name vectors of a cosine classifier."""
        text_encoder = self._component(self.text_encoder)
        ids = self.tokenizer(list(texts), padding="max_length", max_length=TOKENS, truncation=True,
                             return_tensors="pt").input_ids.to(text_encoder.device)
        return text_encoder(ids).pooler_output

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.module(x_t, t, encoder_hidden_states=self._cond(cond, len(x_t))).sample

    def forward_blocks(
        self, x_t: torch.Tensor, t: torch.Tensor, blocks: Sequence[str], cond: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        unknown = [b for b in blocks if b not in self.blocks and b not in self.attention_maps]
        if unknown or not blocks:
            raise ValueError(f"sd15 has no block {unknown}; blocks: {list(self.blocks)}, maps: {list(self.attention_maps)}")
        needed = [b for b in self._layout if b.name in {name.removesuffix(".attn") for name in blocks}]
        mapped = {b.name: b for b in needed if f"{b.name}.attn" in blocks}
        with _record_cross_attention({name: self._cross_attention[name] for name in mapped}) as probs, \
                capture(self.module, {b.name: b.path for b in needed}, stop_after=needed[-1].name) as features:
            self.module(x_t, t, encoder_hidden_states=self._cond(cond, len(x_t)))
        for name, b in mapped.items():
            mean = torch.stack(probs[name]).mean(0)  # over the block's cross-attention layers: (B, h*w, tokens)
            features[f"{name}.attn"] = mean.transpose(1, 2).reshape(len(x_t), TOKENS, b.size_in, b.size_in)
        return {name: features[name] for name in blocks}

    def _cond(self, cond: torch.Tensor | None, batch: int) -> torch.Tensor:
        """No conditioning means the empty prompt (the unconditional embedding)."""
        return self.encode_prompts([""]).expand(batch, -1, -1) if cond is None else cond

    @staticmethod
    def _component(module: nn.Module | None) -> nn.Module:
        if module is None:
            raise ValueError("sd15 built with --weights random/meta has only its UNet: "
                             "encoding images or prompts needs a model folder (--weights FOLDER)")
        return module


class _RecordingProcessor:
    """Records softmax(Q K^T / sqrt(d)) of a cross-attention layer (SD's: no group or cross norm),
    averaged over heads, then runs the layer's own processor unchanged, so block outputs are the
    same with or without maps. Costs a second Q and K projection per layer."""

    def __init__(self, original: Any, sink: list[torch.Tensor]):
        self.original, self.sink = original, sink

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        q = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1)).transpose(1, 2).float()  # (B, heads, h*w, d)
        k = attn.to_k(encoder_hidden_states).unflatten(-1, (attn.heads, -1)).transpose(1, 2).float()  # (B, heads, T, d)
        self.sink.append((q @ k.transpose(-1, -2) * attn.scale).softmax(-1).mean(1).detach())
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)


@contextmanager
def _record_cross_attention(layers: dict[str, list[nn.Module]]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Swap a recording processor into each block's cross-attention layers for the duration of
    one forward; the original processors are always put back."""
    probs: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    originals = [(attn, attn.processor) for attns in layers.values() for attn in attns]
    try:
        for name, attns in layers.items():
            for attn in attns:
                attn.set_processor(_RecordingProcessor(attn.processor, probs[name]))
        yield probs
    finally:
        for attn, processor in originals:
            attn.set_processor(processor)


def alphas_cumprod_from(schedule: dict[str, Any]) -> torch.Tensor:
    """alpha-bar of a diffusers scheduler config ("scaled_linear" is SD's: betas evenly spaced in
    sqrt), computed in float64."""
    n, start, end = schedule["num_train_timesteps"], schedule["beta_start"], schedule["beta_end"]
    if schedule["beta_schedule"] == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    elif schedule["beta_schedule"] == "linear":
        betas = torch.linspace(start, end, n, dtype=torch.float64)
    else:
        raise WeightsError(f"sd15: unsupported beta_schedule {schedule['beta_schedule']!r} (scaled_linear or linear)")
    return torch.cumprod(1 - betas, 0).float()


def _load_folder(folder: Path) -> tuple[nn.Module, nn.Module, nn.Module, Any, dict[str, Any]]:
    """UNet, VAE, text encoder, tokenizer and schedule of a diffusers SD folder, checked to fit together."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
    if missing:
        raise WeightsError(f"{folder} is not a Stable Diffusion model folder: no {', '.join(c + '/' for c in missing)} "
                           "(expected unet/, vae/, text_encoder/, tokenizer/ and optionally scheduler/, as save_pretrained "
                           "or the hub layout gives)")
    unet = load_pretrained(UNet2DConditionModel, folder / "unet", "UNet")
    vae = load_pretrained(AutoencoderKL, folder / "vae", "VAE")
    text_encoder = load_pretrained(CLIPTextModel, folder / "text_encoder", "text encoder")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot load the tokenizer from {folder / 'tokenizer'}: {exc}") from exc
    text = text_encoder.config
    mismatches = [
        f"{a} = {x} but {b} = {y}" for a, x, b, y in (
            ("unet cross_attention_dim", unet.config.cross_attention_dim, "text_encoder hidden_size", text.hidden_size),
            ("unet in_channels", unet.config.in_channels, "vae latent_channels", vae.config.latent_channels),
            # an offline load can yield a 2-token tokenizer without raising (ENVIRONMENT.md)
            ("tokenizer size", len(tokenizer), "text_encoder vocab_size", text.vocab_size),
            ("prompt length", TOKENS, "text_encoder max_position_embeddings", text.max_position_embeddings),
        ) if x != y
    ]
    if mismatches:
        raise WeightsError(f"the components in {folder} do not fit together: " + "; ".join(mismatches))
    schedule_file = folder / "scheduler" / "scheduler_config.json"
    schedule = dict(SD_SCHEDULE)
    if schedule_file.is_file():
        saved = json.loads(schedule_file.read_text())
        schedule.update({k: saved[k] for k in SD_SCHEDULE if k in saved})
    return unet, vae, text_encoder, tokenizer, schedule


@register_backbone("sd15", "Stable Diffusion v1.5 (UNet 860M + VAE + CLIP text), diffusers folder or local HF cache; "
                           "blocks down0..down3, mid, up0..up3 + cross-attention maps")
def build(weights: Path | str | None, config: dict | None, device: str) -> SD15Backbone:
    cfg = SD15Config.parse(config)
    if weights in (RANDOM, META):
        from diffusers import UNet2DConditionModel

        if weights == META:
            with torch.device("meta"):
                unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        else:
            torch.manual_seed(0)
            unet = UNet2DConditionModel(**SD15_UNET_CONFIG).to(device)
        return SD15Backbone(unet, cfg, str(weights), SD_SCHEDULE)
    folder = local_model_folder(weights, HUB_IDS, "unet/config.json", cfg.revision)
    unet, vae, text_encoder, tokenizer, schedule = _load_folder(folder)
    return SD15Backbone(unet.to(device), cfg, folder_digest(folder, [*COMPONENTS, "scheduler"]), schedule,
                        vae.to(device), text_encoder.to(device), tokenizer)
