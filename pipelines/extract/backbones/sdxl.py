"""`sdxl`: Stable Diffusion XL (base 1.0) -- diffusers UNet2DConditionModel with added text-time
conditioning, AutoencoderKL, and two CLIP text encoders.

Conditioning as diffusers' StableDiffusionXLPipeline builds it (encode_prompt, _get_add_time_ids):
the penultimate hidden states (hidden_states[-2], no final layer norm) of CLIPTextModel (ViT-L,
768) and CLIPTextModelWithProjection (OpenCLIP bigG, 1280), concatenated to a 2048-wide context;
`text_embeds` = the second encoder's projected pooled embedding; `time_ids` = original size (h, w)
+ crop top-left (top, left) + target size (h, w), by default (S, S, 0, 0, S, S) for the input size
S. No prompt (the empty prompt) is the unconditional input, all zeros, as the pipeline's negative
conditioning is when the folder's model_index.json says force_zeros_for_empty_prompt (the base
model's, and the default); otherwise "" is encoded like any prompt. In the conditioning tensor the
pooled vector rides as an extra 78th row: cond (n, 78, 2048) = context rows 0..76, then
text_embeds in row 77's first 1280 entries (zeros after), so every path that moves one tensor
(the runner, DDIM inversion, guidance) carries both.

Blocks `down0..down2`, `mid`, `up0..up2` (+ `<block>.attn` cross-attention maps) as in sd.py.
Latents: the VAE posterior mean times its scaling_factor (0.13025 for SDXL). The SDXL VAE
overflows in float16 (its config says force_upcast): it always encodes in float32, with autocast
off, whatever --autocast says; a VAE whose config clears force_upcast (e.g. the fp16-fix VAE in
the folder's vae/) runs under autocast like the UNet.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines.extract.backbone import register_backbone
from pipelines.extract.backbones.sd import SD_SCHEDULE, TOKENS, SDBackbone, load_clip_tokenizer
from pipelines.extract.diffusers_parts import (
    PIXELS,
    check_fit,
    check_prediction_type,
    count_cut,
    parse_options,
    read_schedule,
    require_parts,
)
from pipelines.extract.weights import META, RANDOM, WeightsError, folder_digest, load_pretrained, local_model_folder, materialize

HUB_IDS = ("stabilityai/stable-diffusion-xl-base-1.0",)
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")  # scheduler/ optional
TIME_IDS = 6  # original (h, w), crop (top, left), target (h, w)

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, so RANDOM/META need nothing from disk
# (2,567,463,684 parameters): three levels, 1/2/10 transformer layers in the attention levels,
# 64-channel heads (5/10/20), 2048-wide context, 256-wide sinusoidal features of each of the six
# time ids + the 1280-wide pooled text embedding (6 * 256 + 1280 = 2816) added to the time embedding.
SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048,
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu", "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1, "mid_block_scale_factor": 1,
}


# --backbone-config: input size S in pixels; the time ids' original size [h, w] (default [S, S])
# and crop top-left [top, left] (default [0, 0]); what the UNet predicts (default: the folder's
# scheduler config, else epsilon); revision of the hub id in the local cache.
OPTIONS: dict[str, tuple[Any, Any]] = {
    "image_size": (PIXELS, 1024), "original_size": (list, None), "crop_top_left": (list, [0, 0]),
    "prediction_type": (str, None), "revision": (str, None),
}


def time_ids(name: str, options: dict[str, Any]) -> list[int]:
    """original size + crop top-left + target size, the pipeline's add_time_ids order; sizes that
    are not two integers >= 1 (crop: >= 0) are refused in one line."""
    for key, value, low in (("original_size", options["original_size"], 1),
                            ("crop_top_left", options["crop_top_left"], 0)):
        if value is not None and not (len(value) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= low for v in value)):
            raise ValueError(f"{name} {key} must be two integers >= {low} ([h, w] or [top, left]), got {value!r}")
    size = [options["image_size"]] * 2
    return [*(options["original_size"] or size), *options["crop_top_left"], *size]


class SDXLBackbone(SDBackbone):
    """SDXL's UNet, VAE and two text encoders (see the module docstring)."""

    def __init__(self, name: str, unet: nn.Module, options: dict[str, Any], prediction_type: str,
                 schedule: dict[str, Any], weights_digest: str, vae: nn.Module | None = None,
                 text_encoders: Sequence[nn.Module] = (), tokenizers: Sequence[Any] = (), zero_empty_prompt: bool = True):
        """`options`: the parsed --backbone-config (OPTIONS)."""
        super().__init__(name, unet, options["image_size"], prediction_type, schedule, weights_digest, (200,),
                         text_layer="penultimate", vae=vae)
        self.text_encoders, self.tokenizers = list(text_encoders), list(tokenizers)
        self.zero_empty_prompt = zero_empty_prompt
        self.time_ids = torch.tensor(time_ids(name, options), dtype=torch.float32)
        self.context = unet.config.cross_attention_dim
        self.pooled = unet.config.projection_class_embeddings_input_dim - TIME_IDS * unet.config.addition_time_embed_dim

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "time_ids": self.time_ids.int().tolist(),
                "text_layer": "penultimate hidden states of both text encoders (no final norm), concatenated",
                "parameters_note": "UNet only: the VAE and the two CLIP text encoders are not counted"}

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """(n, 4, H/8, W/8): the VAE posterior mean times scaling_factor, in float32 with autocast
        off when the VAE's config says force_upcast (SDXL's VAE overflows in float16)."""
        vae = self._component(self.vae)
        if not vae.config.force_upcast:
            return super().encode_latents(images)
        with torch.autocast(images.device.type, enabled=False):
            return vae.encode(images.float()).latent_dist.mean * vae.config.scaling_factor

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """(len(prompts), 78, 2048): rows 0..76 the concatenated penultimate hidden states of the two
        text encoders, row 77 the pooled `text_embeds` of the second (zero-padded); the empty prompt
        all zeros when force_zeros_for_empty_prompt."""
        self._component(self.text_encoders or None)
        hidden = []
        for text_encoder, tokenizer in zip(self.text_encoders, self.tokenizers):
            ids = tokenizer(list(prompts), padding="max_length", max_length=TOKENS, truncation=True,
                            return_tensors="pt").input_ids.to(text_encoder.device)
            out = text_encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        pooled = out.text_embeds  # of the second encoder, the one with a projection
        context = torch.cat(hidden, dim=-1)
        row = torch.zeros(len(prompts), 1, self.context, dtype=context.dtype, device=context.device)
        row[:, 0, : self.pooled] = pooled
        cond = torch.cat([context, row], dim=1)
        if self.zero_empty_prompt:
            cond[torch.tensor([p == "" for p in prompts], device=cond.device)] = 0
        return cond

    def truncated_prompts(self, prompts: Sequence[str]) -> tuple[int, int]:
        """(77, how many prompts either tokenizer makes longer than 77 tokens)."""
        return TOKENS, count_cut(prompts, self._component(self.tokenizers or None), TOKENS)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), 1280): the second text encoder's projected pooled embedding (`text_embeds`,
        the pooled vector SDXL is conditioned on), the class-name vectors of a cosine classifier."""
        text_encoder = self._component(self.text_encoders or None)[-1]
        ids = self.tokenizers[-1](list(texts), padding="max_length", max_length=TOKENS, truncation=True,
                                  return_tensors="pt").input_ids.to(text_encoder.device)
        return text_encoder(ids).text_embeds

    def unet_inputs(self, cond: torch.Tensor | None, batch: int) -> dict[str, Any]:
        """The context (n, 77, 2048) and added_cond_kwargs {text_embeds (n, 1280), time_ids (n, 6)}."""
        cond = self._cond(cond, batch)
        time_ids = self.time_ids.to(cond.device, cond.dtype).expand(batch, -1)
        return {"encoder_hidden_states": cond[:, :TOKENS],
                "added_cond_kwargs": {"text_embeds": cond[:, TOKENS, : self.pooled], "time_ids": time_ids}}


def _load_folder(folder: Path) -> tuple[nn.Module, nn.Module, list[nn.Module], list[Any], bool]:
    """UNet, VAE, both text encoders and tokenizers of a diffusers SDXL folder, checked to fit
    together, and force_zeros_for_empty_prompt (model_index.json; the pipeline's default True)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    require_parts(folder, "an SDXL", COMPONENTS)
    unet = load_pretrained(UNet2DConditionModel, folder / "unet", "UNet")
    if unet.config.addition_embed_type != "text_time":
        raise WeightsError(f"the UNet in {folder} has addition_embed_type = {unet.config.addition_embed_type}, "
                           "not text_time: not an SDXL UNet (use sd for SD 1.x/2.x)")
    vae = load_pretrained(AutoencoderKL, folder / "vae", "VAE")
    encoders = [load_pretrained(CLIPTextModel, folder / "text_encoder", "text encoder"),
                load_pretrained(CLIPTextModelWithProjection, folder / "text_encoder_2", "second text encoder")]
    unet_cfg, (first, second) = unet.config, (e.config for e in encoders)
    pooled = unet_cfg.projection_class_embeddings_input_dim - TIME_IDS * unet_cfg.addition_time_embed_dim
    check_fit(folder, [
        ("unet cross_attention_dim", unet_cfg.cross_attention_dim, "text_encoder + text_encoder_2 hidden_size",
         first.hidden_size + second.hidden_size),
        ("unet projection_class_embeddings_input_dim - 6 x addition_time_embed_dim", pooled,
         "text_encoder_2 projection_dim", second.projection_dim),
        ("unet in_channels", unet_cfg.in_channels, "vae latent_channels", vae.config.latent_channels),
    ])
    tokenizers = [load_clip_tokenizer(folder / sub, encoder) for sub, encoder in zip(("tokenizer", "tokenizer_2"), encoders)]
    if pooled > unet_cfg.cross_attention_dim:
        raise WeightsError(f"the components in {folder}: a {pooled}-wide pooled text embedding wider than the "
                           f"{unet_cfg.cross_attention_dim}-wide context is not supported")
    index = folder / "model_index.json"
    zero_empty = json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True) if index.is_file() else True
    return unet, vae, encoders, tokenizers, bool(zero_empty)


@register_backbone("sdxl", "Stable Diffusion XL base 1.0 (UNet 2.6B + VAE + two CLIP text encoders), diffusers folder "
                           "or local HF cache; blocks down0..down2, mid, up0..up2 + cross-attention maps")
def build(weights: Path | str | None, config: dict | None, device: str) -> SDXLBackbone:
    from diffusers import UNet2DConditionModel

    options = parse_options("sdxl", config, OPTIONS)
    time_ids("sdxl", options)  # refused before any loading
    check_prediction_type("sdxl", options["prediction_type"])
    if weights in (RANDOM, META):
        unet, digest = materialize(partial(UNet2DConditionModel, **SDXL_UNET_CONFIG), weights, None, device)
        return SDXLBackbone("sdxl", unet, options, options["prediction_type"] or "epsilon", SD_SCHEDULE, digest)
    folder = local_model_folder(weights, HUB_IDS, "unet/config.json", options["revision"])
    unet, vae, encoders, tokenizers, zero_empty = _load_folder(folder)
    schedule, predicts = read_schedule(folder, SD_SCHEDULE)
    return SDXLBackbone("sdxl", unet.to(device), options, options["prediction_type"] or predicts or "epsilon", schedule,
                        folder_digest(folder, [*COMPONENTS, "scheduler", "model_index.json"]), vae.to(device),
                        [e.to(device) for e in encoders], tokenizers, zero_empty)
