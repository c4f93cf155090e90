"""Tiny random diffusers transformer folders (DiT, PixArt, SD3, FLUX) written with save_pretrained
in the hub layouts, so the real loading code runs offline in seconds. Images are 64 px: the VAE
downsamples 3 times (8x8 latents), so a patch-2 transformer sees a 4x4 token grid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tiny_models import WORDS, _clip_vocab_and_merges

T5_WORDS = ("a", "photo", "of", "the", "cat", "dog")


def vae(folder: Path, latent_channels: int, scaling: float, shift: float | None = None) -> None:
    from diffusers import AutoencoderKL

    AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=8,
                  latent_channels=latent_channels, sample_size=64, scaling_factor=scaling,
                  shift_factor=shift).save_pretrained(folder)


def clip(folder: Path, encoder: str, tokenizer: str, hidden: int, projection: bool = False) -> None:
    """A CLIP text encoder (with a text projection of width `hidden` when `projection`) and its BPE tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges(WORDS)
    config = CLIPTextConfig(vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=2, projection_dim=hidden)
    (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).save_pretrained(folder / encoder)
    CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(folder / tokenizer)


def t5(folder: Path, encoder: str, tokenizer: str, d_model: int) -> None:
    """A 2-layer T5 encoder and a unigram tokenizer of whole words and letters (+ 4 unused ids, as
    T5's table is larger than its tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    pieces = ["<pad>", "</s>", "<unk>", "▁", *(f"▁{w}" for w in T5_WORDS), *"abcdefghijklmnopqrstuvwxyz"]
    model = Tokenizer(models.Unigram([(p, -1.0) for p in pieces], unk_id=2))
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    T5TokenizerFast(tokenizer_object=model, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                    extra_ids=0).save_pretrained(folder / tokenizer)
    T5EncoderModel(T5Config(vocab_size=len(pieces) + 4, d_model=d_model, d_ff=37, d_kv=8, num_layers=2, num_heads=2,
                            pad_token_id=0, eos_token_id=1)).save_pretrained(folder / encoder)


def write(folder: str | Path, kind: str) -> Path:
    """A tiny `kind` folder (dit, pixart, sd3, flux) with seed-0 random weights."""
    from diffusers import (
        DDIMScheduler,
        DiTTransformer2DModel,
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
        PixArtTransformer2DModel,
        SD3Transformer2DModel,
    )

    folder = Path(folder)
    ddpm = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if kind == "dit":
            transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                out_channels=8, num_layers=3, sample_size=8, patch_size=2,
                                                num_embeds_ada_norm=10)
            vae(folder / "vae", 4, 0.18215)
            scheduler = DDIMScheduler(**ddpm)
        elif kind == "pixart":
            transformer = PixArtTransformer2DModel(num_attention_heads=3, attention_head_dim=8, in_channels=4,
                                                   out_channels=8, num_layers=3, cross_attention_dim=24, sample_size=8,
                                                   patch_size=2, caption_channels=32, use_additional_conditions=True)
            vae(folder / "vae", 4, 0.18215)
            t5(folder, "text_encoder", "tokenizer", 32)
            scheduler = DDIMScheduler(**ddpm)
        elif kind == "sd3":
            transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=3,
                                                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                                caption_projection_dim=16, pooled_projection_dim=24, out_channels=16,
                                                pos_embed_max_size=8)
            vae(folder / "vae", 16, 1.5305, 0.0609)
            clip(folder, "text_encoder", "tokenizer", 8, projection=True)
            clip(folder, "text_encoder_2", "tokenizer_2", 16, projection=True)
            t5(folder, "text_encoder_3", "tokenizer_3", 32)
            scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        elif kind == "flux":
            transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                                 pooled_projection_dim=16, guidance_embeds=True,
                                                 axes_dims_rope=(2, 2, 4))
            vae(folder / "vae", 4, 0.3611, 0.1159)
            clip(folder, "text_encoder", "tokenizer", 16)
            t5(folder, "text_encoder_2", "tokenizer_2", 32)
            scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                        max_shift=1.15)
        else:
            raise ValueError(f"no tiny {kind}")
        transformer.save_pretrained(folder / "transformer")
        scheduler.save_pretrained(folder / "scheduler")
    return folder


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    """(n, 3, 64, 64) float32 in [-1, 1]."""
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def pre_hooks(module: torch.nn.Module, paths: dict[str, str]) -> tuple[list[str], list[Any]]:
    """Record the name of every listed submodule as it starts running: (order list, handles)."""
    ran: list[str] = []
    handles = [module.get_submodule(p).register_forward_pre_hook(lambda m, a, name=name: ran.append(name))
               for name, p in paths.items()]
    return ran, handles


def as_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, height·width, C) row-major tokens -> (B, C, height, width), position by position."""
    return torch.stack([torch.stack([tokens[:, i * width + j] for j in range(width)], -1) for i in range(height)], -2)


def hooked_outputs(module: torch.nn.Module, paths: dict[str, str], element: int, run: Any) -> dict[str, torch.Tensor]:
    """Run `run()` (a full forward of `module`) with plain forward hooks recording each listed
    submodule's output (element `element` of a tuple output)."""
    out: dict[str, torch.Tensor] = {}
    handles = [module.get_submodule(p).register_forward_hook(
        lambda m, a, o, name=name: out.__setitem__(name, o[element] if isinstance(o, tuple) else o))
        for name, p in paths.items()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return out


def copy_of(folder: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, tmp_path / "copy"))


def rename_a_key(weights: Path) -> str:
    """Rename the first key of a safetensors file (to `<key>.renamed`); returns the old key."""
    from safetensors.torch import load_file, save_file

    state = load_file(weights)
    key = sorted(state)[0]
    state[key + ".renamed"] = state.pop(key)
    save_file(state, weights)
    return key
