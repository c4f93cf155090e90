"""`sd`: any diffusers Stable Diffusion 1.x/2.x text-to-image folder -- UNet2DConditionModel +
AutoencoderKL + CLIP text encoder -- and its presets `sd15` (v1.5), `sd21` (2.1, 768 px,
v-prediction) and `sd21-base` (2.1-base, 512 px, epsilon).

Blocks `down0..`, `mid`, `up0..` are the outputs of `down_blocks.i` (hidden states after the
block's downsampler), `mid_block`, `up_blocks.j`; `<block>.attn` is the cross-attention map (tokens
x h x w) of each block that has cross-attention. The forward stops after the last requested block.
Weights: a diffusers model folder (unet/, vae/, text_encoder/, tokenizer/, optional scheduler/), or
a hub id found in the LOCAL Hugging Face cache (never a download), or, for a preset, RANDOM/META
(the UNet alone, built from the released config below).

What the model predicts comes from the folder's scheduler config (`prediction_type`: epsilon or
v_prediction; without one, the preset's, else diffusers' default epsilon); `predict_eps` always
returns eps. The text encoder conditions the UNet with its last hidden state (after the final
layer norm), as diffusers' StableDiffusionPipeline does. For SD 2.x that IS the layer the model was
trained with, OpenCLIP-H's penultimate layer through its final norm (Stability-AI/stablediffusion,
FrozenOpenCLIPEmbedder(layer="penultimate")): the diffusers SD 2 text encoder has 23 of OpenCLIP's
24 layers, the last one dropped at conversion (diffusers single_file_utils,
SD_2_TEXT_ENCODER_KEYS_TO_IGNORE = resblocks.23). `text_layer: penultimate` takes one layer less.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines.extract.backbone import Backbone, InputSpec, Prepared, register_backbone
from pipelines.extract.diffusers_parts import (
    PIXELS,
    alphas_cumprod_from,
    check_fit,
    check_prediction_type,
    count_cut,
    encode_each,
    latent_factor,
    load_tokenizer,
    parse_options,
    read_schedule,
    require_parts,
)
from pipelines.extract.hooks import capture
from pipelines.extract.weights import (
    META,
    RANDOM,
    WeightsError,
    folder_digest,
    load_pretrained,
    local_model_folder,
    materialize,
)

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer")  # scheduler/ is optional
TOKENS = 77  # CLIP's context: every prompt is padded to it

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
# stabilityai/stable-diffusion-2-1 unet/config.json (865,910,724 parameters): v1.5's layout with
# OpenCLIP-H's 1024-wide context, 5/10/20/20 heads per level (diffusers' `attention_head_dim` here
# counts heads: 64 channels each), linear projections into the transformers, attention computed in
# float32 (the 768 px v-model overflowed in fp16). 2.1-base is the 512 px model without upcasting.
SD21_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG, "sample_size": 96, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True, "upcast_attention": True,
}
SD21_BASE_UNET_CONFIG: dict[str, Any] = {**SD21_UNET_CONFIG, "sample_size": 64, "upcast_attention": False}
# SD's training schedule (1.x, 2.x and XL), used when a folder has no scheduler/scheduler_config.json.
SD_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
}


@dataclass(frozen=True)
class Preset:
    """A released model: its hub ids (looked up in the local cache), UNet config (RANDOM/META),
    input size in pixels, what its UNet predicts, and default timesteps."""

    hub_ids: tuple[str, ...]
    unet_config: dict[str, Any]
    image_size: int
    prediction_type: str
    default_timesteps: tuple[int, ...]


PRESETS: dict[str, Preset] = {
    "sd15": Preset(("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5"),
                   SD15_UNET_CONFIG, 512, "epsilon", (200,)),
    # DIFT (Tang et al. 2023, src/models/dift_sd.py, SPair-71k setting): SD 2.1 at 768 px, t = 261
    "sd21": Preset(("stabilityai/stable-diffusion-2-1",), SD21_UNET_CONFIG, 768, "v_prediction", (261,)),
    "sd21-base": Preset(("stabilityai/stable-diffusion-2-1-base",), SD21_BASE_UNET_CONFIG, 512, "epsilon", (261,)),
}


# --backbone-config: input size in pixels (default: the preset's, else the UNet's sample_size times
# the VAE's factor), which text layer conditions the UNet ("last", or "penultimate": the layer before
# the last, through the final layer norm), what the UNet predicts (epsilon or v_prediction; default:
# the folder's scheduler config, else the preset's), revision of the hub id in the local cache.
OPTIONS: dict[str, tuple[Any, Any]] = {
    "image_size": (PIXELS, None), "text_layer": (str, "last"), "prediction_type": (str, None), "revision": (str, None),
}


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


def eps_from_prediction(output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor,
                        prediction_type: str) -> torch.Tensor:
    """eps from a UNet output (n, C, h, w) at per-sample alpha-bar (n,): the output itself for
    epsilon; for v_prediction (v = sqrt(ab)·eps − sqrt(1 − ab)·x0, Salimans & Ho 2022, sec. 4)
    eps = sqrt(ab)·v + sqrt(1 − ab)·x_t, as diffusers' DDIMScheduler.step computes pred_epsilon.
    Computed in float32, returned in the output's dtype."""
    if prediction_type == "epsilon":
        return output
    ab = alpha_bar.to(x_t.device, torch.float32).view(-1, *[1] * (x_t.ndim - 1))
    return (ab.sqrt() * output.float() + (1 - ab).sqrt() * x_t.float()).to(output.dtype)


class SDBackbone(Backbone):
    """A Stable Diffusion UNet with its VAE and CLIP text encoder (see the module docstring)."""

    conditional = True
    tokens = TOKENS

    def __init__(self, name: str, unet: nn.Module, image_size: int, prediction_type: str, schedule: dict[str, Any],
                 weights_digest: str, default_timesteps: tuple[int, ...], text_layer: str = "last",
                 vae: nn.Module | None = None, text_encoder: nn.Module | None = None, tokenizer: Any = None):
        from diffusers.models.attention_processor import Attention

        check_prediction_type(name, prediction_type)
        self.name = name
        self.module = unet
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.prediction_type, self.text_layer = prediction_type, text_layer
        self.default_timesteps = default_timesteps
        self.weights_digest = weights_digest
        self.input = InputSpec(size=image_size, channels=3, value_range=(-1.0, 1.0))
        self._alphas_cumprod = alphas_cumprod_from(schedule)
        factor = latent_factor(vae)
        channels = unet.config.block_out_channels
        multiple = factor * 2 ** (len(channels) - 1)  # so every down block halves an even size
        if image_size % multiple:
            raise ValueError(f"{name} image_size must be a multiple of {multiple}, got {image_size}")
        self._layout = block_layout(channels, image_size // factor)
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
        return {f"{b.name}.attn": (self.tokens, b.size_in, b.size_in) for b in self._layout if self._cross_attention[b.name]}

    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas_cumprod

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "prediction_type": self.prediction_type, "text_layer": self.text_layer,
                "parameters_note": "UNet only: the VAE and the CLIP text encoder are not counted"}

    def prepare(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> Prepared:
        """VAE latents (the MEAN of the latent distribution, not a sample: a latent depends on the
        image alone) and text embeddings, each distinct prompt encoded once; no prompt = ""."""
        cond = encode_each(self.encode_prompts, prompts, len(images))
        return Prepared(self.encode_latents(images), cond)

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """(n, 4, H/8, W/8): the VAE posterior mean of images (n, 3, H, W) in [-1, 1], times the VAE's
        scaling_factor (0.18215 for SD 1.x/2.x)."""
        vae = self._component(self.vae)
        return vae.encode(images).latent_dist.mean * vae.config.scaling_factor

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """(len(prompts), 77, D): CLIP's last hidden state, or its penultimate layer's output
        through the final layer norm (`text_layer: penultimate`)."""
        text_encoder, tokenizer = self._component(self.text_encoder), self.tokenizer
        ids = tokenizer(list(prompts), padding="max_length", max_length=TOKENS, truncation=True,
                        return_tensors="pt").input_ids.to(text_encoder.device)
        if self.text_layer == "last":
            return text_encoder(ids).last_hidden_state
        hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        # transformers 5 keeps the layer norm on the model itself, 4.x under .text_model
        return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)

    def truncated_prompts(self, prompts: Sequence[str]) -> tuple[int, int]:
        """(77, how many prompts have more than 77 tokens, start and end included): encode_prompts
        cuts those. Each distinct prompt is tokenized once."""
        return TOKENS, count_cut(prompts, [self._component(self.tokenizer)], TOKENS)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), D): CLIP's pooled text embedding (the end-of-text token after the final layer
        norm), the class-name vectors of a cosine classifier."""
        text_encoder = self._component(self.text_encoder)
        ids = self.tokenizer(list(texts), padding="max_length", max_length=TOKENS, truncation=True,
                             return_tensors="pt").input_ids.to(text_encoder.device)
        return text_encoder(ids).pooler_output

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The noise eps (n, C, h, w) the UNet predicts at x_t and integer timesteps t (n,); a
        v-prediction output is converted (eps_from_prediction)."""
        output = self.module(x_t, t, **self.unet_inputs(cond, len(x_t))).sample
        return eps_from_prediction(output, x_t, self._alphas_cumprod[t.cpu()], self.prediction_type)

    def unet_inputs(self, cond: torch.Tensor | None, batch: int) -> dict[str, Any]:
        """The UNet's conditioning keywords for `cond` (None: the unconditional prompt)."""
        return {"encoder_hidden_states": self._cond(cond, batch)}

    def forward_blocks(
        self, x_t: torch.Tensor, t: torch.Tensor, blocks: Sequence[str], cond: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        unknown = [b for b in blocks if b not in self.blocks and b not in self.attention_maps]
        if unknown or not blocks:
            raise ValueError(f"{self.name} has no block {unknown}; blocks: {list(self.blocks)}, maps: {list(self.attention_maps)}")
        needed = [b for b in self._layout if b.name in {name.removesuffix(".attn") for name in blocks}]
        mapped = {b.name: b for b in needed if f"{b.name}.attn" in blocks}
        inputs = self.unet_inputs(cond, len(x_t))
        with _record_cross_attention({name: self._cross_attention[name] for name in mapped}) as probs, \
                capture(self.module, {b.name: b.path for b in needed}, stop_after=needed[-1].name) as features:
            self.module(x_t, t, **inputs)
        for name, b in mapped.items():
            mean = torch.stack(probs[name]).mean(0)  # over the block's cross-attention layers: (B, h*w, tokens)
            features[f"{name}.attn"] = mean.transpose(1, 2).reshape(len(x_t), self.tokens, b.size_in, b.size_in)
        return {name: features[name] for name in blocks}

    def _cond(self, cond: torch.Tensor | None, batch: int) -> torch.Tensor:
        """No conditioning means the empty prompt (the unconditional embedding)."""
        return self.encode_prompts([""]).expand(batch, -1, -1) if cond is None else cond

    def _component(self, module: Any) -> Any:
        if module is None:
            raise ValueError(f"{self.name} built with --weights random/meta has only its UNet: "
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


# -- loading a folder -----------------------------------------------------------------------------

def load_clip_tokenizer(folder: Path, text_encoder: nn.Module) -> Any:
    """The CLIP tokenizer in `folder` (tokenizer/, tokenizer_2/), refused unless it fits its text
    encoder: the same vocabulary size, and positions for the 77-token prompt."""
    from transformers import CLIPTokenizer

    text = text_encoder.config
    check_fit(folder.parent, [("prompt length", TOKENS, f"{folder.name.replace('tokenizer', 'text_encoder')} "
                                                       "max_position_embeddings", text.max_position_embeddings)])
    return load_tokenizer(CLIPTokenizer, folder, text.vocab_size, exact=True)


def _load_folder(folder: Path) -> tuple[nn.Module, nn.Module, nn.Module, Any]:
    """UNet, VAE, text encoder and tokenizer of a diffusers SD folder, checked to fit together."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    require_parts(folder, "a Stable Diffusion", COMPONENTS)
    unet = load_pretrained(UNet2DConditionModel, folder / "unet", "UNet")
    if unet.config.addition_embed_type is not None:
        raise WeightsError(f"the UNet in {folder} takes added conditioning ({unet.config.addition_embed_type}): "
                           "not an SD 1.x/2.x text-to-image UNet (use sdxl for SDXL)")
    vae = load_pretrained(AutoencoderKL, folder / "vae", "VAE")
    text_encoder = load_pretrained(CLIPTextModel, folder / "text_encoder", "text encoder")
    check_fit(folder, [
        ("unet cross_attention_dim", unet.config.cross_attention_dim, "text_encoder hidden_size",
         text_encoder.config.hidden_size),
        ("unet in_channels", unet.config.in_channels, "vae latent_channels", vae.config.latent_channels),
    ])
    tokenizer = load_clip_tokenizer(folder / "tokenizer", text_encoder)
    return unet, vae, text_encoder, tokenizer


def build_sd(name: str, preset: Preset | None, weights: Path | str | None, config: dict | None,
             device: str) -> SDBackbone:
    """The `sd` backbone (preset None: a folder or hub id is required) or one of its presets."""
    from diffusers import UNet2DConditionModel

    options = parse_options(name, config, OPTIONS)
    if options["text_layer"] not in ("last", "penultimate"):
        raise ValueError(f"{name} text_layer must be 'last' or 'penultimate', got {options['text_layer']!r}")
    check_prediction_type(name, options["prediction_type"])
    common = {"text_layer": options["text_layer"], "default_timesteps": preset.default_timesteps if preset else (200,)}
    if weights in (RANDOM, META) or (preset is None and weights is None):
        if preset is None:
            raise ValueError(f"{name} is built from a model: pass --weights FOLDER or a hub id in the local "
                             f"Hugging Face cache (for --weights random/meta use a preset: {', '.join(PRESETS)})")
        unet, digest = materialize(partial(UNet2DConditionModel, **preset.unet_config), weights, None, device)
        return SDBackbone(name, unet, options["image_size"] or preset.image_size,
                          options["prediction_type"] or preset.prediction_type, SD_SCHEDULE, digest, **common)
    folder = local_model_folder(weights, preset.hub_ids if preset else (), "unet/config.json", options["revision"])
    unet, vae, text_encoder, tokenizer = _load_folder(folder)
    schedule, predicts = read_schedule(folder, SD_SCHEDULE)  # predicts: None when the config names none
    prediction_type = options["prediction_type"] or predicts or (preset.prediction_type if preset else "epsilon")
    image_size = options["image_size"] or (preset.image_size if preset else _native_size(name, unet, vae))
    return SDBackbone(name, unet.to(device), image_size, prediction_type, schedule,
                      folder_digest(folder, [*COMPONENTS, "scheduler"]), **common,
                      vae=vae.to(device), text_encoder=text_encoder.to(device), tokenizer=tokenizer)


def _native_size(name: str, unet: nn.Module, vae: nn.Module) -> int:
    """The size the UNet was trained at: its sample_size (latent pixels) times the VAE's factor."""
    sample = unet.config.sample_size
    if not isinstance(sample, int):
        raise ValueError(f"{name}: the UNet's sample_size is {sample!r}; set image_size in --backbone-config")
    return sample * 2 ** (len(vae.config.block_out_channels) - 1)


register_backbone("sd", "Any diffusers Stable Diffusion 1.x/2.x folder (UNet + VAE + CLIP text; epsilon or "
                        "v_prediction), local folder or HF cache; blocks down*, mid, up* + cross-attention maps")(
    partial(build_sd, "sd", None))
register_backbone("sd15", "Stable Diffusion v1.5 (UNet 860M + VAE + CLIP text), diffusers folder or local HF cache; "
                          "blocks down0..down3, mid, up0..up3 + cross-attention maps")(partial(build_sd, "sd15", PRESETS["sd15"]))
register_backbone("sd21", "Stable Diffusion 2.1 (768 px, v-prediction; UNet 866M + VAE + OpenCLIP-H text), diffusers "
                          "folder or local HF cache; blocks down0..down3, mid, up0..up3 + cross-attention maps")(
    partial(build_sd, "sd21", PRESETS["sd21"]))
register_backbone("sd21-base", "Stable Diffusion 2.1-base (512 px, epsilon; UNet 866M + VAE + OpenCLIP-H text), "
                               "diffusers folder or local HF cache; blocks down0..down3, mid, up0..up3 + "
                               "cross-attention maps")(partial(build_sd, "sd21-base", PRESETS["sd21-base"]))
