"""`pixart`: PixArt-α / PixArt-Σ (Chen et al. 2023, 2024), diffusers PixArtTransformer2DModel + AutoencoderKL + T5.

Blocks `layer0..layerN-1` are the outputs of `transformer_blocks.i` (self-attention, cross-attention
to the T5 tokens, MLP): (B, h·w, 1152) patch tokens as (1152, h, w) maps (64x64 at 1024 px). The
prompt is encoded as PixArtAlphaPipeline.encode_prompt does: T5 over `max_sequence_length` tokens
(120 for α, 300 for Σ), padded, with the attention mask passed to the transformer as
encoder_attention_mask ("" is the unconditional prompt; the pipeline's optional caption cleaning
is not applied). A transformer with additional conditions (α at 1024 px) gets the image's
resolution (H, W) and aspect ratio H/W, as the pipeline gives them. Noise: PixArt's linear DDPM betas.
Weights: a diffusers PixArt folder (transformer/, vae/, text_encoder/, tokenizer/, optional
scheduler/), a hub id in the LOCAL cache, or RANDOM/META (the transformer alone, PixArt-α XL-2-1024-MS's config).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines.extract.backbone import register_backbone
from pipelines.extract.diffusers_parts import (
    PIXELS,
    check_fit,
    check_prediction_type,
    load_tokenizer,
    parse_options,
    read_schedule,
    require_parts,
)
from pipelines.extract.token_maps import DDPMTransformerBackbone, TokenBlock, build_module, digest, load_parts
from pipelines.extract.weights import META, RANDOM, local_model_folder

HUB_IDS = ("PixArt-alpha/PixArt-XL-2-1024-MS", "PixArt-alpha/PixArt-XL-2-512x512",
           "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS")
PARTS = ("transformer", "vae", "text_encoder", "tokenizer")
# PixArt-alpha/PixArt-XL-2-1024-MS transformer/config.json (sample_size 128: additional conditions on).
PIXART_ALPHA_1024: dict[str, Any] = {
    "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": 8, "num_layers": 28,
    "dropout": 0.0, "norm_num_groups": 32, "cross_attention_dim": 1152, "attention_bias": True, "sample_size": 128,
    "patch_size": 2, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000, "upcast_attention": False,
    "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": 1e-6, "caption_channels": 4096,
    "attention_type": "default",
}
PIXART_SCHEDULE: dict[str, Any] = {  # PixArt's training diffusion (DiT's), when a folder has no scheduler/
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
}
OPTIONS: dict[str, tuple[Any, Any]] = {  # image_size default: sample_size x the VAE factor; 300 tokens for Σ
    "image_size": (PIXELS, None), "max_sequence_length": (int, 120), "revision": (str, None),
}


class PixArtBackbone(DDPMTransformerBackbone):
    name = "pixart"

    def __init__(self, module: nn.Module, options: dict[str, Any], weights_digest: str, schedule: dict[str, Any],
                 vae: nn.Module | None = None, text_encoder: nn.Module | None = None, tokenizer: Any = None):
        config = module.config
        layout = [TokenBlock(f"layer{i}", f"transformer_blocks.{i}") for i in range(config.num_layers)]
        super().__init__(module, layout, options["image_size"], config.patch_size, weights_digest, vae,
                         options["max_sequence_length"], schedule=schedule)
        self.text_encoder, self.tokenizer = text_encoder, tokenizer

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """(len(prompts), L, D + 1): T5's last hidden state over the L = max_sequence_length padded
        tokens (computed under their attention mask), then the mask (1 = token, 0 = padding) as
        the last channel."""
        encoder = self.part(self.text_encoder, "T5 text encoder")
        inputs = self.part(self.tokenizer, "tokenizer")(list(prompts), padding="max_length", max_length=self.tokens,
                                                        truncation=True, add_special_tokens=True, return_tensors="pt")
        device = next(encoder.parameters()).device
        mask = inputs.attention_mask.to(device)
        tokens = encoder(inputs.input_ids.to(device), attention_mask=mask)[0]
        return torch.cat([tokens, mask[..., None].to(tokens.dtype)], -1)

    def truncated_prompts(self, prompts: Sequence[str]) -> tuple[int, int]:
        """(max_sequence_length, how many prompts have more T5 tokens, end token included)."""
        return self.tokens, self.count_cut(self.tokenizer, prompts, self.tokens)

    def _call(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> Any:
        """The transformer on latents x_t (B, C, h, w) at timesteps t (B,). `cond` (B, L, D + 1) is
        packed as `encode_prompts` returns it: channels 0..D−1 the T5 tokens (encoder_hidden_states),
        the last channel the attention mask (encoder_attention_mask, 1 = token, 0 = padding)."""
        tokens, mask = cond[..., :-1], cond[..., -1]
        added = {"resolution": None, "aspect_ratio": None}
        if self.module.use_additional_conditions:  # the pipeline's [height, width] and height / width, in pixels
            size = float(self.input.size)
            added = {"resolution": torch.tensor([[size, size]], dtype=x_t.dtype, device=x_t.device).expand(len(x_t), 2),
                     "aspect_ratio": torch.ones(len(x_t), 1, dtype=x_t.dtype, device=x_t.device)}
        return self.module(x_t, encoder_hidden_states=tokens, timestep=t, encoder_attention_mask=mask,
                           added_cond_kwargs=added)


@register_backbone("pixart", "PixArt-α/Σ (transformer 611M + VAE + T5), diffusers folder or local HF cache; "
                             "blocks layer0..layer27 as (1152, 64, 64) token maps at 1024 px")
def build(weights: Path | str | None, config: dict | None, device: str) -> PixArtBackbone:
    from diffusers import AutoencoderKL, PixArtTransformer2DModel
    from transformers import T5EncoderModel, T5TokenizerFast

    options = parse_options("pixart", config, OPTIONS)
    if weights in (RANDOM, META):
        module = build_module(PixArtTransformer2DModel, PIXART_ALPHA_1024, str(weights), device)
        return PixArtBackbone(module, options, str(weights), PIXART_SCHEDULE)
    folder = local_model_folder(weights, HUB_IDS, "transformer/config.json", options["revision"])
    require_parts(folder, "a PixArt", PARTS)
    schedule, predicts = read_schedule(folder, PIXART_SCHEDULE)
    check_prediction_type("pixart", predicts, ("epsilon",))
    parts = load_parts(folder, {"transformer": (PixArtTransformer2DModel, "PixArt transformer"),
                                "vae": (AutoencoderKL, "VAE"), "text_encoder": (T5EncoderModel, "T5 text encoder")})
    transformer, vae, text = parts["transformer"], parts["vae"], parts["text_encoder"]
    check_fit(folder, [
        ("transformer caption_channels", transformer.config.caption_channels,
         "text_encoder d_model", text.config.d_model),
        ("transformer in_channels", transformer.config.in_channels, "vae latent_channels", vae.config.latent_channels),
    ])
    tokenizer = load_tokenizer(T5TokenizerFast, folder / "tokenizer", text.config.vocab_size, exact=False)
    return PixArtBackbone(transformer.to(device), options, digest(folder, PARTS), schedule, vae.to(device),
                          text.to(device), tokenizer)
