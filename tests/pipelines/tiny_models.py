"""Tiny random models written with save_pretrained into the layouts the real ones use, so the real
loading code runs offline in a second: a Stable Diffusion folder and a BLIP captioning folder."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

# Words tokenized whole by the tiny tokenizers; any other lowercase word falls back to letters.
WORDS = ("a", "photo", "of", "the", "cat", "dog", "digit", "drawing", "sketch", "zero", "one", "two")


def _clip_vocab_and_merges(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP BPE tables: every letter (word-inner and word-final `</w>`), then one merge chain per
    word, left to right (c + a -> ca, ca + t</w> -> cat</w>)."""
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)]
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = [*word[:-1], word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            if (merged, piece) not in merges:
                merges.append((merged, piece))
                tokens.append(merged + piece)
            merged += piece
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}, merges


def write_tiny_sd(folder: str | Path, full_size: bool = False) -> Path:
    """A diffusers SD folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/) with random
    weights: ~1M parameters, or with `full_size` the real SD v1.5 shapes (UNet 860M, VAE 84M, a
    768-wide 12-layer text encoder; ~4 GB on disk) for speed work. The VAE downsamples 3 times like
    SD's (latents are image size // 8); the UNet's cross-attention width matches the text encoder;
    the scheduler has SD's scaled_linear betas. The tokenizer is the small offline one either way."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from pipelines.extract.backbones.sd import SD15_UNET_CONFIG

    folder = Path(folder)
    vocab, merges = _clip_vocab_and_merges(WORDS)
    if full_size:
        unet = SD15_UNET_CONFIG
        vae = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512)
        text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
    else:
        unet = dict(sample_size=8, layers_per_block=1, block_out_channels=(32, 64),
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
        vae = dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, sample_size=64)
        text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        UNet2DConditionModel(**unet).save_pretrained(folder / "unet")
        AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                      latent_channels=4, **vae).save_pretrained(folder / "vae")
        CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                     pad_token_id=1, **text)).save_pretrained(folder / "text_encoder")
    CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(folder / "tokenizer")
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  skip_prk_steps=True).save_pretrained(folder / "scheduler")
    return folder


def write_tiny_blip(folder: str | Path) -> Path:
    """A BLIP captioning folder (the blip-image-captioning-base layout): 32-wide vision and text
    models, 64 px images in 16 px patches, a BERT word-piece tokenizer whose bos is [DEC]."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder = Path(folder)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS]
    vocab = {token: i for i, token in enumerate(tokens)}
    config = BlipConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 64, "patch_size": 16},
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "encoder_hidden_size": 32, "max_position_embeddings": 64,
                     "bos_token_id": vocab["[DEC]"], "sep_token_id": vocab["[SEP]"], "eos_token_id": vocab["[SEP]"],
                     "pad_token_id": vocab["[PAD]"]},
        projection_dim=32,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        BlipForConditionalGeneration(config).save_pretrained(folder)
    BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 64, "width": 64}),
        tokenizer=BertTokenizer(vocab=vocab, bos_token="[DEC]"),
    ).save_pretrained(folder)
    return folder
