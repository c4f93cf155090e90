"""`dit`: DiT (Peebles & Xie 2023), diffusers DiTTransformer2DModel + AutoencoderKL, class-conditional.

Blocks `layer0..layerN-1` are the outputs of `transformer_blocks.i`: (B, h·w, 1152) patch tokens as
(1152, h, w) maps (DiT-XL/2 at 256 px: 16x16). The prompt of an image is its class: an index
("207"), an ImageNet label of the folder's model_index.json `id2label` (each comma-separated name,
as DiTPipeline.get_label_ids), or "" for the null class (index num_classes, the classifier-free
guidance embedding DiT trains with class dropout 0.1). Noise: DiT's linear DDPM betas.
Weights: a diffusers DiT folder (transformer/, vae/, optional scheduler/ and model_index.json), a
hub id in the LOCAL cache, or RANDOM/META (the transformer alone, DiT-XL/2-256's config below).
"""

from __future__ import annotations

import json
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
    parse_options,
    read_schedule,
    require_parts,
)
from pipelines.extract.token_maps import DDPMTransformerBackbone, TokenBlock, build_module, digest, load_parts
from pipelines.extract.weights import META, RANDOM, local_model_folder

HUB_IDS = ("facebook/DiT-XL-2-256",)
PARTS = ("transformer", "vae")
# facebook/DiT-XL-2-256 transformer/config.json: 749,826,464 parameters in diffusers' layout, whose
# AdaLayerNormZero repeats the timestep and class embedders (2,777,472 each) in all 28 blocks where
# the paper's model shares one set (675M).
DIT_XL_2_256: dict[str, Any] = {
    "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": 8, "num_layers": 28,
    "dropout": 0.0, "norm_num_groups": 32, "attention_bias": True, "sample_size": 32, "patch_size": 2,
    "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000, "upcast_attention": False,
    "norm_type": "ada_norm_zero", "norm_elementwise_affine": False, "norm_eps": 1e-5,
}
# DiT's diffusion (its gaussian_diffusion with the "linear" schedule), when a folder has no scheduler/.
DIT_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
}
OPTIONS: dict[str, tuple[Any, Any]] = {  # image_size default: the transformer's sample_size x the VAE factor
    "image_size": (PIXELS, None), "revision": (str, None),
}


class DiTBackbone(DDPMTransformerBackbone):
    name = "dit"

    def __init__(self, module: nn.Module, image_size: int | None, weights_digest: str, schedule: dict[str, Any],
                 vae: nn.Module | None = None, id2label: dict[str, str] | None = None):
        config = module.config
        layout = [TokenBlock(f"layer{i}", f"transformer_blocks.{i}") for i in range(config.num_layers)]
        super().__init__(module, layout, image_size, config.patch_size, weights_digest, vae, schedule=schedule)
        self.classes = int(config.num_embeds_ada_norm)
        self.labels = {name.strip(): int(k) for k, names in (id2label or {}).items() for name in names.split(",")}

    def label(self, prompt: str) -> int:
        """The class index of a prompt: "" -> the null class (num_classes), "207" -> 207, or an
        id2label name; anything else is refused in one line."""
        if prompt == "":
            return self.classes
        if prompt.strip().isdigit() and int(prompt) < self.classes:
            return int(prompt)
        if prompt in self.labels:
            return self.labels[prompt]
        names = "an id2label name, " if self.labels else ""
        raise ValueError(f"dit takes a class as its prompt: {prompt!r} is none of '' (the null class), an index "
                         f"0..{self.classes - 1} or {names}e.g. --prompt classnames:{{}} or file:CSV of indices")

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """(len(prompts),) int64 class labels (see `label`), on the transformer's device."""
        return torch.tensor([self.label(p) for p in prompts], dtype=torch.long, device=self._device())

    def truncated_prompts(self, prompts: Sequence[str]) -> tuple[int, int]:
        """(1, 0): a prompt is one class label, never cut; every distinct prompt is checked to be a class."""
        for prompt in dict.fromkeys(prompts):
            self.label(prompt)
        return 1, 0

    def _call(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> Any:
        """The transformer on latents x_t at timesteps t; `cond` (B,) int64 class labels."""
        return self.module(x_t, timestep=t, class_labels=cond)

    def _device(self) -> torch.device:
        return next(self.module.parameters()).device


@register_backbone("dit", "DiT (class-conditional, null class = unconditional; DiT-XL/2-256 675M) + VAE, diffusers "
                          "folder or local HF cache; blocks layer0..layer27 as (1152, 16, 16) token maps")
def build(weights: Path | str | None, config: dict | None, device: str) -> DiTBackbone:
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    options = parse_options("dit", config, OPTIONS)
    if weights in (RANDOM, META):
        module = build_module(DiTTransformer2DModel, DIT_XL_2_256, str(weights), device)
        return DiTBackbone(module, options["image_size"], str(weights), DIT_SCHEDULE)
    folder = local_model_folder(weights, HUB_IDS, "transformer/config.json", options["revision"])
    require_parts(folder, "a DiT", PARTS)
    schedule, predicts = read_schedule(folder, DIT_SCHEDULE)
    check_prediction_type("dit", predicts, ("epsilon",))
    parts = load_parts(folder, {"transformer": (DiTTransformer2DModel, "DiT transformer"),
                                "vae": (AutoencoderKL, "VAE")})
    check_fit(folder, [("transformer in_channels", parts["transformer"].config.in_channels,
                        "vae latent_channels", parts["vae"].config.latent_channels)])
    index = folder / "model_index.json"
    id2label = json.loads(index.read_text()).get("id2label") if index.is_file() else None
    return DiTBackbone(parts["transformer"].to(device), options["image_size"], digest(folder, (*PARTS, index.name)),
                       schedule, parts["vae"].to(device), id2label)
