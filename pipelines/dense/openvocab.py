"""Open-vocabulary segmentation (Vermouth's setting): pixel embeddings projected into the space of
class-name text embeddings (`featurestore text-embed`), trained on the seen classes only, scored on
seen and unseen classes.

Training: each pixel's logits are cosines against the SEEN classes' text embeddings / T; pixels of
unseen classes are mapped to the ignore index before the loss (images holding them stay, their
other pixels train, as SPNet does), so neither their labels nor the unseen classes' text
embeddings enter training. Test: cosines against every class's text embedding; one confusion matrix
over all classes; mIoU of the seen classes, of the unseen classes (each over the classes whose IoU
is defined) and their harmonic mean 2 S U / (S + U) (ZS3Net, SPNet).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from featurestore.store import FeatureStore
from pipelines.dense.heads import CosineLogits
from pipelines.dense.metrics import IGNORE_INDEX, harmonic_mean, subset_miou
from pipelines.heads.data import Batch
from pipelines.heads.text_embeddings import select_text_embeddings

HARMONIC_VARIANT = "harmonic mean 2 S U / (S + U) of the seen-class mIoU S and the unseen-class mIoU U (ZS3Net, SPNet)"


@dataclass
class OpenVocab:
    """The classes, their text embeddings (K, D) and which are seen, for `dense_run`."""

    classes: list[str]
    text: Tensor
    unseen: list[str]
    temperature: float
    text_file: str
    text_sha256: str

    def __post_init__(self) -> None:
        unknown = [c for c in self.unseen if c not in self.classes]
        if unknown:
            raise ValueError(f"--unseen names classes the targets lack: {', '.join(unknown)} "
                             f"(classes: {', '.join(self.classes)})")
        if not self.seen:
            raise ValueError("--unseen leaves no seen class to train on")
        self.seen_index = torch.tensor([self.classes.index(c) for c in self.seen])
        lut = torch.full((256,), IGNORE_INDEX, dtype=torch.long)
        lut[self.seen_index] = torch.arange(len(self.seen_index))
        self.lut = lut  # mask value -> position among the seen classes; unseen and ignored -> IGNORE_INDEX

    @property
    def seen(self) -> list[str]:
        return [c for c in self.classes if c not in self.unseen]

    def training_masks(self, masks: Tensor) -> Tensor:
        """(B, S, S): the seen class's position among the seen classes; IGNORE_INDEX for pixels of
        unseen classes and ignored pixels."""
        return self.lut.to(masks.device)[masks.long()]

    def train_logits(self, module: CosineLogits, batch: Batch) -> Tensor:
        """(B, len(seen), S, S) float logits of a batch: cosines of `module`'s pixel embeddings
        against the SEEN classes' text embeddings (float32, (len(seen), D)) / temperature, in the
        order of `seen` (the positions `training_masks` gives)."""
        return module(batch.features, self.text[self.seen_index].to(batch.labels.device))

    def test_logits(self, module: CosineLogits, batch: Batch) -> Tensor:
        """(B, K, S, S) float logits of a batch against every class's text embedding (float32,
        (K, D), unseen classes included), in class order."""
        return module(batch.features, self.text.to(batch.labels.device))

    def scores(self, per_class_iou: dict[str, float | None]) -> dict:
        seen, unseen = subset_miou(per_class_iou, self.seen), subset_miou(per_class_iou, self.unseen)
        return {"miou_seen": seen, "miou_unseen": unseen, "harmonic": harmonic_mean(seen, unseen),
                "seen_classes": self.seen, "unseen_classes": list(self.unseen), "harmonic_variant": HARMONIC_VARIANT}

    def settings(self) -> dict:
        return {"text_embeddings_sha256": self.text_sha256, "unseen": list(self.unseen),
                "temperature": self.temperature}


def load_openvocab(classes: Sequence[str], text_file: str, unseen: Sequence[str], temperature: float) -> OpenVocab:
    """An OpenVocab from a text-embedding table holding (at least) every class of the targets.
    ValueError naming --text-embeddings when the file cannot be read."""
    try:
        text = select_text_embeddings(text_file, list(classes))
        digest = hashlib.sha256(Path(text_file).read_bytes()).hexdigest()
    except OSError as exc:
        raise ValueError(f"--text-embeddings {text_file}: cannot read it ({exc.strerror or exc})") from exc
    return OpenVocab(list(classes), text, list(dict.fromkeys(unseen)), temperature, text_file, digest)


def openvocab_run(store: FeatureStore, cfg, results: Path, text_file: str, unseen: Sequence[str],
                  temperature: float = 0.07) -> dict:
    """`dense_run` of `cfg` (a segmentation DenseConfig) in the open-vocabulary setting."""
    from featurestore.targets import run_targets
    from pipelines.dense.runner import dense_run
    from pipelines.heads.logistic import resolve_run

    classes = list(run_targets(resolve_run(store, cfg.run_id)).classes)
    return dense_run(store, cfg, results, openvocab=load_openvocab(classes, text_file, unseen, temperature))
