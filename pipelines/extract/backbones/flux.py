"""`flux`: FLUX.1 [dev] / [schnell] (Black Forest Labs), diffusers FluxTransformer2DModel + VAE + CLIP-L + T5.

The latents (16 x H/8 x W/8, (mean − shift_factor)·scaling_factor) are packed as FluxPipeline does:
2x2 patches, row by row, into (H/16·W/16) tokens of 64 channels, with image ids (0, row, col) and
zero text ids. Blocks `layer0..layer18` are the IMAGE tokens of the double-stream
`transformer_blocks.i` and `single0..single37` those of the single-stream
`single_transformer_blocks.i` (both return (text tokens, image tokens)), unpacked to (3072, h, w)
maps (64 x 64 at 1024 px). Prompts as FluxPipeline.encode_prompt: CLIP-L's pooled output over 77
tokens, T5's last hidden state over `max_sequence_length` tokens (512). A model with a guidance
embedding ([dev]) gets `guidance` (3.5, the pipeline's default). Noise: flow matching
(token_maps.FlowMatchingBackbone); the transformer reads σ = t/1000 (the pipeline's timestep / 1000).
Weights: a diffusers FLUX folder, a hub id in the LOCAL cache, or RANDOM/META (the transformer
alone, FLUX.1 [dev]'s config below).
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
    load_tokenizer,
    parse_options,
    read_schedule,
    require_parts,
)
from pipelines.extract.token_maps import (
    CLIP_TOKENS,
    FlowMatchingBackbone,
    TokenBlock,
    build_module,
    digest,
    load_parts,
    pack_rows,
    unpack_rows,
)
from pipelines.extract.weights import META, RANDOM, local_model_folder

HUB_IDS = ("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell")
PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
# black-forest-labs/FLUX.1-dev transformer/config.json and scheduler/scheduler_config.json.
FLUX_DEV: dict[str, Any] = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
FLUX_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
}
OPTIONS: dict[str, tuple[Any, Any]] = {
    "image_size": (PIXELS, 1024), "max_sequence_length": (int, 512), "guidance": (float, 3.5), "revision": (str, None),
}
PACK = 2  # 2x2 latent patches per token


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2·W/2, 4C): FluxPipeline._pack_latents (2x2 patches, row by row, channel-major)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // PACK, PACK, w // PACK, PACK).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, -1, c * PACK * PACK)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(height·width, 3): (0, row, col) of each packed token, as FluxPipeline._prepare_latent_image_ids."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(device, dtype)


class FluxBackbone(FlowMatchingBackbone):
    name = "flux"

    def __init__(self, module: nn.Module, options: dict[str, Any], weights_digest: str, schedule: dict[str, Any],
                 vae: nn.Module | None = None, clip: tuple[nn.Module, Any] | None = None,
                 t5: tuple[nn.Module, Any] | None = None, guidance_given: bool = False):
        config = module.config
        layout = [TokenBlock(f"layer{i}", f"transformer_blocks.{i}", element=1) for i in range(config.num_layers)]
        layout += [TokenBlock(f"single{i}", f"single_transformer_blocks.{i}", element=1)
                   for i in range(config.num_single_layers)]
        super().__init__(module, layout, options["image_size"], PACK * config.patch_size, weights_digest, vae,
                         options["max_sequence_length"], schedule=schedule)
        if config.patch_size != 1:
            raise ValueError(f"flux expects a transformer with patch_size 1 on packed latents, got {config.patch_size}")
        if guidance_given and not config.guidance_embeds:
            raise ValueError("flux: this transformer has no guidance embedding ([schnell]): drop guidance from "
                             "--backbone-config")
        self.guidance = float(options["guidance"]) if config.guidance_embeds else None
        self.clip, self.t5 = clip, t5

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """(len(prompts), L + 1, joint_attention_dim): T5's last hidden state over L =
        max_sequence_length tokens, then CLIP-L's pooled output as the last row (token_maps.pack_rows)."""
        (clip, clip_tokenizer), (t5, t5_tokenizer) = self.part(self.clip, "CLIP text encoder"), self.part(self.t5, "T5")
        ids = clip_tokenizer(list(prompts), padding="max_length", max_length=CLIP_TOKENS, truncation=True,
                             return_tensors="pt").input_ids
        pooled = clip(ids.to(next(clip.parameters()).device)).pooler_output
        ids = t5_tokenizer(list(prompts), padding="max_length", max_length=self.tokens, truncation=True,
                           return_tensors="pt").input_ids
        tokens = t5(ids.to(next(t5.parameters()).device))[0]
        return pack_rows(tokens, pooled)

    def truncated_prompts(self, prompts: Sequence[str]) -> tuple[int, int]:
        """(max_sequence_length, how many prompts have more T5 tokens); CLIP reads the first 77."""
        return self.tokens, self.count_cut(self.t5[1] if self.t5 else None, prompts, self.tokens)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "guidance": self.guidance}

    def _call(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> Any:
        """The transformer on latents x_t (B, 16, h, w), packed (`pack`), at integer timesteps t (B,),
        read as σ = t/1000. `cond` (B, L + 1, joint_attention_dim) is packed as `encode_prompts`
        returns it: rows 0..L−1 the T5 tokens (encoder_hidden_states), the last row's first
        pooled_projection_dim entries CLIP-L's pooled output (pooled_projections)."""
        tokens, pooled = unpack_rows(cond, self.module.config.pooled_projection_dim)
        n = len(x_t)
        guidance = None if self.guidance is None else torch.full((n,), self.guidance, device=x_t.device)
        return self.module(
            hidden_states=pack(x_t), timestep=self.sigma(t.to(x_t.device).float()).to(x_t.dtype),
            encoder_hidden_states=tokens, pooled_projections=pooled, guidance=guidance,
            img_ids=image_ids(self.grid, self.grid, x_t.device, x_t.dtype),
            txt_ids=torch.zeros(tokens.shape[1], 3, device=x_t.device, dtype=x_t.dtype),
        )


@register_backbone("flux", "FLUX.1 dev/schnell (transformer 12B) + VAE + CLIP-L + T5, flow matching, packed latents, "
                           "diffusers folder or local HF cache; blocks layer0..18, single0..37 (3072, 64, 64)")
def build(weights: Path | str | None, config: dict | None, device: str) -> FluxBackbone:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    options = parse_options("flux", config, OPTIONS)
    guidance_given = "guidance" in (config or {})
    if weights in (RANDOM, META):
        module = build_module(FluxTransformer2DModel, FLUX_DEV, str(weights), device)
        return FluxBackbone(module, options, str(weights), FLUX_SCHEDULE, guidance_given=guidance_given)
    folder = local_model_folder(weights, HUB_IDS, "transformer/config.json", options["revision"])
    require_parts(folder, "a FLUX", PARTS)
    parts = load_parts(folder, {
        "transformer": (FluxTransformer2DModel, "FLUX transformer"), "vae": (AutoencoderKL, "VAE"),
        "text_encoder": (CLIPTextModel, "CLIP text encoder"), "text_encoder_2": (T5EncoderModel, "T5 text encoder"),
    })
    transformer, vae, clip, t5 = (parts[p] for p in ("transformer", "vae", "text_encoder", "text_encoder_2"))
    check_fit(folder, [
        ("transformer in_channels", transformer.config.in_channels,
         "4 x vae latent_channels", 4 * vae.config.latent_channels),
        ("transformer pooled_projection_dim", transformer.config.pooled_projection_dim,
         "text_encoder hidden_size", clip.config.hidden_size),
        ("transformer joint_attention_dim", transformer.config.joint_attention_dim,
         "text_encoder_2 d_model", t5.config.d_model),
    ])
    clip_tokenizer = load_tokenizer(CLIPTokenizer, folder / "tokenizer", clip.config.vocab_size, exact=True)
    t5_tokenizer = load_tokenizer(T5TokenizerFast, folder / "tokenizer_2", t5.config.vocab_size, exact=False)
    return FluxBackbone(transformer.to(device), options, digest(folder, PARTS), read_schedule(folder, FLUX_SCHEDULE)[0],
                        vae.to(device), (clip.to(device), clip_tokenizer), (t5.to(device), t5_tokenizer),
                        guidance_given)
