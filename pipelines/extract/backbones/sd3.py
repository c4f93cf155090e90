"""`sd3`: Stable Diffusion 3 / 3.5 (Esser et al. 2024), diffusers SD3Transformer2DModel (MMDiT) + VAE + 3 text encoders.

Blocks `layer0..layerN-1` are the IMAGE tokens of `transformer_blocks.i` (a joint-attention block
returns (text tokens, image tokens)) as (C, h, w) maps (SD3-medium at 1024 px: 1536 x 64 x 64).
Prompts are encoded as StableDiffusion3Pipeline.encode_prompt does: each CLIP's penultimate hidden
state over 77 tokens, concatenated on channels and zero-padded to T5's width, then T5's last hidden
state over `max_sequence_length` tokens (256; zeros when the folder has no text_encoder_3, as the
pipeline does); the pooled vector is both CLIPs' projected text embeddings. Latents are
(mean − shift_factor)·scaling_factor. Noise: flow matching (token_maps.FlowMatchingBackbone), the
transformer reads t = 1000·σ as its timestep. Weights: a diffusers SD3 folder, a hub id in the LOCAL
cache, or RANDOM/META (the transformer alone, SD3-medium's config below).
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
from pipelines.extract.weights import META, RANDOM, WeightsError, local_model_folder

HUB_IDS = ("stabilityai/stable-diffusion-3-medium-diffusers", "stabilityai/stable-diffusion-3.5-medium",
           "stabilityai/stable-diffusion-3.5-large")
PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
T5_PARTS = ("text_encoder_3", "tokenizer_3")  # optional: without them the T5 tokens are zeros
# stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json.
SD3_MEDIUM: dict[str, Any] = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192,
}
SD3_SCHEDULE: dict[str, Any] = {  # its FlowMatchEulerDiscreteScheduler
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15,
}
OPTIONS: dict[str, tuple[Any, Any]] = {  # image_size default: sample_size x the VAE factor
    "image_size": (PIXELS, None), "max_sequence_length": (int, 256), "revision": (str, None),
}


class SD3Backbone(FlowMatchingBackbone):
    name = "sd3"

    def __init__(self, module: nn.Module, options: dict[str, Any], weights_digest: str, schedule: dict[str, Any],
                 vae: nn.Module | None = None, clips: Sequence[tuple[nn.Module, Any]] = (),
                 t5: tuple[nn.Module, Any] | None = None):
        config = module.config
        layout = [TokenBlock(f"layer{i}", f"transformer_blocks.{i}", element=1) for i in range(config.num_layers)]
        super().__init__(module, layout, options["image_size"], config.patch_size, weights_digest, vae,
                         options["max_sequence_length"], schedule=schedule)
        if self.grid > config.pos_embed_max_size:
            raise ValueError(f"sd3 image_size {self.input.size} gives {self.grid}x{self.grid} patches, more than the "
                             f"transformer's pos_embed_max_size {config.pos_embed_max_size}")
        self.clips, self.t5 = list(clips), t5

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """(len(prompts), 77 + L + 1, joint_attention_dim): the CLIP tokens (both CLIPs' penultimate
        layers side by side, zero-padded), the T5 tokens (L = max_sequence_length), then the
        pooled (CLIP-L text_embeds, CLIP-G text_embeds) as the last row (token_maps.pack_rows)."""
        if not self.clips:
            self.part(None, "text encoders")
        hidden, pooled = [], []
        for encoder, tokenizer in self.clips:
            device = next(encoder.parameters()).device
            ids = tokenizer(list(prompts), padding="max_length", max_length=CLIP_TOKENS, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        width = self.module.config.joint_attention_dim
        clip = torch.nn.functional.pad(torch.cat(hidden, -1), (0, width - sum(h.shape[-1] for h in hidden)))
        if self.t5 is None:
            t5 = clip.new_zeros(len(prompts), self.tokens, width)
        else:
            encoder, tokenizer = self.t5
            ids = tokenizer(list(prompts), padding="max_length", max_length=self.tokens, truncation=True,
                            add_special_tokens=True, return_tensors="pt").input_ids
            t5 = encoder(ids.to(next(encoder.parameters()).device))[0]
        return pack_rows(torch.cat([clip, t5.to(clip.dtype)], 1), torch.cat(pooled, -1))

    def truncated_prompts(self, prompts: Sequence[str]) -> tuple[int, int]:
        """(max_sequence_length, how many prompts have more T5 tokens); without T5: (77, how many
        have more CLIP tokens). The CLIPs always read the first 77 tokens, as the pipeline."""
        if self.t5 is None:
            return CLIP_TOKENS, self.count_cut(self.clips[0][1] if self.clips else None, prompts, CLIP_TOKENS)
        return self.tokens, self.count_cut(self.t5[1], prompts, self.tokens)

    def _call(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> Any:
        """The transformer on latents x_t (B, 16, h, w) at timesteps t (B,) = 1000·σ. `cond`
        (B, 77 + L + 1, joint_attention_dim) is packed as `encode_prompts` returns it: rows 0..76
        the CLIP tokens and rows 77..77+L−1 the T5 tokens (encoder_hidden_states), the last row's
        first pooled_projection_dim entries the pooled CLIP-L + CLIP-G embedding (pooled_projections)."""
        tokens, pooled = unpack_rows(cond, self.module.config.pooled_projection_dim)
        return self.module(hidden_states=x_t, timestep=t, encoder_hidden_states=tokens, pooled_projections=pooled)


@register_backbone("sd3", "Stable Diffusion 3/3.5 MMDiT (SD3-medium 2B) + VAE + CLIP-L/G + T5, flow matching, "
                          "diffusers folder or local HF cache; blocks layer0..layer23 (1536, 64, 64)")
def build(weights: Path | str | None, config: dict | None, device: str) -> SD3Backbone:
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    options = parse_options("sd3", config, OPTIONS)
    if weights in (RANDOM, META):
        module = build_module(SD3Transformer2DModel, SD3_MEDIUM, str(weights), device)
        return SD3Backbone(module, options, str(weights), SD3_SCHEDULE)
    folder = local_model_folder(weights, HUB_IDS, "transformer/config.json", options["revision"])
    require_parts(folder, "a Stable Diffusion 3", PARTS)
    with_t5 = (folder / "text_encoder_3").is_dir()
    parts = load_parts(folder, {
        "transformer": (SD3Transformer2DModel, "SD3 transformer"), "vae": (AutoencoderKL, "VAE"),
        "text_encoder": (CLIPTextModelWithProjection, "CLIP-L text encoder"),
        "text_encoder_2": (CLIPTextModelWithProjection, "CLIP-G text encoder"),
        **({"text_encoder_3": (T5EncoderModel, "T5 text encoder")} if with_t5 else {}),
    })
    transformer, clip_l, clip_g = parts["transformer"], parts["text_encoder"], parts["text_encoder_2"]
    config = transformer.config
    check_fit(folder, [
        ("transformer in_channels", config.in_channels, "vae latent_channels", parts["vae"].config.latent_channels),
        ("transformer pooled_projection_dim", config.pooled_projection_dim,
         "text_encoder + text_encoder_2 projection_dim", clip_l.config.projection_dim + clip_g.config.projection_dim),
        ("transformer joint_attention_dim", config.joint_attention_dim,
         "text_encoder_3 d_model", parts["text_encoder_3"].config.d_model if with_t5 else config.joint_attention_dim),
    ])
    if clip_l.config.hidden_size + clip_g.config.hidden_size > config.joint_attention_dim:
        raise WeightsError(f"the components in {folder} do not fit together: the CLIP widths "
                         f"{clip_l.config.hidden_size} + {clip_g.config.hidden_size} exceed joint_attention_dim "
                         f"{config.joint_attention_dim}")
    clips = [(encoder.to(device), load_tokenizer(CLIPTokenizer, folder / sub, encoder.config.vocab_size, exact=True))
             for encoder, sub in ((clip_l, "tokenizer"), (clip_g, "tokenizer_2"))]
    t5 = None
    if with_t5:
        encoder = parts["text_encoder_3"]
        tokenizer = load_tokenizer(T5TokenizerFast, folder / "tokenizer_3", encoder.config.vocab_size, exact=False)
        t5 = (encoder.to(device), tokenizer)
    return SD3Backbone(transformer.to(device), options, digest(folder, (*PARTS, *T5_PARTS)),
                       read_schedule(folder, SD3_SCHEDULE)[0], parts["vae"].to(device), clips, t5)
