"""Image captioning for `--prompt blip`: BLIP (blip-image-captioning-base layout) from a local
folder or the local Hugging Face cache, greedy decoding so a caption depends on the image alone."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from PIL import Image

from pipelines.extract.weights import WeightsError, folder_digest, load_pretrained, local_model_folder

DEFAULT_BLIP = "Salesforce/blip-image-captioning-base"


class BlipCaptioner:
    """Captions images in batches. `key` names the store's captions table: it changes with the
    model's files and with every option that changes a caption (not with device or batch size)."""

    def __init__(self, weights: str | Path | None, device: str = "cpu", max_new_tokens: int = 30, batch_size: int = 16):
        from transformers import BlipForConditionalGeneration, BlipProcessor

        folder = local_model_folder(weights, (DEFAULT_BLIP,), "config.json")
        self.model = load_pretrained(BlipForConditionalGeneration, folder, "BLIP captioner").to(device)
        try:
            self.processor = BlipProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise WeightsError(f"cannot load the BLIP processor from {folder}: {exc}") from exc
        self.device, self.max_new_tokens, self.batch_size = device, max_new_tokens, batch_size
        self.info = {"model": str(weights or DEFAULT_BLIP), "digest": folder_digest(folder), "max_new_tokens": max_new_tokens}
        options = json.dumps({"digest": self.info["digest"], "max_new_tokens": max_new_tokens}, sort_keys=True)
        self.key = "blip-" + hashlib.sha256(options.encode()).hexdigest()[:12]

    def caption(self, images: list[Image.Image]) -> list[str]:
        """One stripped caption per image, greedy (no sampling, one beam): deterministic."""
        captions: list[str] = []
        for start in range(0, len(images), self.batch_size):
            batch = [image.convert("RGB") for image in images[start:start + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device, self.model.dtype)
            ids = self.model.generate(pixel_values=pixels, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
            captions += [text.strip() for text in self.processor.batch_decode(ids, skip_special_tokens=True)]
        return captions
