"""Dense heads: per-pixel outputs from cached block maps, at the stored target size S x S.

Every head maps {(timestep, block): (B, C, h, w) float tensor} to (B, out_channels, S, S): class
logits (segmentation), one channel of depth in metres, or pixel embeddings in a text space
(open-vocabulary segmentation, `CosineLogits`). Kinds:
- `linear`: one map; LayerNorm over channels at each position (one learning rate then suits
  blocks of any scale, as the pooled linear probe does), a 1x1 conv, and the outputs upsampled
  bilinearly (align_corners=False) to S x S. Linear in the normalised features.
- `hypercolumn`: several maps, each upsampled bilinearly to S x S and concatenated, then the pixel
  classifier of ddpm-segmentation (Baranchuk et al. 2022, src/pixel_classifier.py, itself from
  datasetGAN): Linear(D, 128) ReLU BatchNorm(128) Linear(128, 32) ReLU BatchNorm(32) Linear(32, K)
  for K < 30 outputs, widths 256 and 128 otherwise; Linear weights N(0, 0.02), biases 0 (their
  `init_weights('normal', 0.02)`; BatchNorm keeps PyTorch's init, as theirs does for BatchNorm1d).
  Applied at every pixel as 1x1 convs and BatchNorm2d (statistics over the batch's pixels, where
  theirs sees random pixels of many images). Differences: one classifier, not their ensemble of
  10 with majority vote; maps are those of the store (their features are upsampled to the image).
- `uhead`: the uhead's feature pyramid (pipelines/heads/modules.py `UHead`: levels coarse to fine,
  Conv3x3 + GroupNorm + SiLU to `width`, fused by upsampling and concatenation) ending in a 1x1
  conv to the outputs at the finest level's size, upsampled bilinearly to S x S. At least two blocks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipelines.heads.modules import HeadSpec, Key, Shape, UHead, resized

KINDS = ("linear", "hypercolumn", "uhead")


@dataclass
class DenseSpec:
    """What decides a dense head's architecture: saved beside its weights."""

    kind: str
    inputs: dict[Key, Shape]  # (timestep, block) -> (C, h, w), in the order given
    out_channels: int  # classes, 1 (depth) or the text width (open vocabulary)
    size: int  # S: the side of the stored targets the outputs are upsampled to
    width: int = 128  # uhead: pyramid width

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown dense head {self.kind!r}; heads: {', '.join(KINDS)}")
        if self.kind == "linear" and len(self.inputs) != 1:
            raise ValueError(f"the linear dense head reads one (timestep, block), got {len(self.inputs)}: "
                             "use --grid for one head each, or --head hypercolumn|uhead to fuse them")
        if self.kind == "uhead" and len({b for _, b in self.inputs}) < 2:
            raise ValueError("the uhead fuses several blocks: give at least two --block")
        if self.out_channels < 1 or self.size < 1 or self.width < 1:
            raise ValueError("dense head sizes must be positive")

    def to_json(self) -> dict:
        return {**asdict(self), "inputs": [[t, b, list(s)] for (t, b), s in self.inputs.items()]}

    @classmethod
    def from_json(cls, doc: Mapping) -> DenseSpec:
        return cls(**{**doc, "inputs": {(t, b): tuple(s) for t, b, s in doc["inputs"]}})


class DenseHead(nn.Module):
    """Base: `maps` gives (B, out, h, w) at the head's own resolution; `forward` upsamples to S x S."""

    def __init__(self, spec: DenseSpec):
        super().__init__()
        self.spec = spec
        self.keys: list[Key] = list(spec.inputs)

    def maps(self, features: Mapping[Key, Tensor]) -> Tensor:
        raise NotImplementedError

    def forward(self, features: Mapping[Key, Tensor]) -> Tensor:
        return resized(self.maps(features), (self.spec.size, self.spec.size))


class PixelLinear(DenseHead):
    def __init__(self, spec: DenseSpec):
        super().__init__(spec)
        ((c, _, _),) = spec.inputs.values()
        self.norm = nn.LayerNorm(c)
        self.conv = nn.Conv2d(c, spec.out_channels, 1)

    def maps(self, features: Mapping[Key, Tensor]) -> Tensor:
        x = self.norm(features[self.keys[0]].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv(x)


def ddpm_segmentation_widths(out_channels: int) -> tuple[int, int]:
    """The pixel classifier's hidden widths: (128, 32) below 30 outputs, else (256, 128)."""
    return (128, 32) if out_channels < 30 else (256, 128)


class Hypercolumn(DenseHead):
    def __init__(self, spec: DenseSpec):
        super().__init__(spec)
        dim = sum(c for c, _, _ in spec.inputs.values())
        h1, h2 = ddpm_segmentation_widths(spec.out_channels)
        self.layers = nn.Sequential(
            nn.Conv2d(dim, h1, 1), nn.ReLU(), nn.BatchNorm2d(h1),
            nn.Conv2d(h1, h2, 1), nn.ReLU(), nn.BatchNorm2d(h2),
            nn.Conv2d(h2, spec.out_channels, 1),
        )
        for m in self.layers:
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)

    def maps(self, features: Mapping[Key, Tensor]) -> Tensor:
        size = (self.spec.size, self.spec.size)
        return self.layers(torch.cat([resized(features[k], size) for k in self.keys], dim=1))


class DenseUHead(DenseHead):
    def __init__(self, spec: DenseSpec):
        super().__init__(spec)
        self.pyramid = UHead(HeadSpec(kind="uhead", inputs=dict(spec.inputs), num_classes=1, width=spec.width,
                                      pooling="conv"))
        self.pyramid.pool = nn.Identity()  # keep the finest fused map, (B, width, h, w)
        self.pyramid.classifier = nn.Identity()  # the image-level classifier is not used
        self.out = nn.Conv2d(spec.width, spec.out_channels, 1)

    def maps(self, features: Mapping[Key, Tensor]) -> Tensor:
        return self.out(self.pyramid.embed(features, None))


HEADS: dict[str, type[DenseHead]] = {"linear": PixelLinear, "hypercolumn": Hypercolumn, "uhead": DenseUHead}


def build_dense_head(spec: DenseSpec) -> DenseHead:
    return HEADS[spec.kind](spec)


class CosineLogits(nn.Module):
    """Open-vocabulary logits: (B, K, S, S) = <normalize(e), normalize(text_k)> / T for the pixel
    embeddings e = head(features) (B, D, S, S) and class-name embeddings `text` (K, D) given at
    each call (the seen classes' in training, every class's at test), as Vermouth's cosine
    classifier does per image (temperature 0.07 by default, as our image-level cosine heads)."""

    def __init__(self, head: DenseHead, temperature: float = 0.07):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"--temperature must be positive (logits are cosines / T), got {temperature}")
        self.head = head
        self.temperature = temperature

    def forward(self, features: Mapping[Key, Tensor], text: Tensor) -> Tensor:
        e = F.normalize(self.head(features), dim=1)
        return torch.einsum("bdhw,kd->bkhw", e, F.normalize(text, dim=1)) / self.temperature


def save_dense_head(head: DenseHead, path: Path, extra: Mapping | None = None) -> None:
    """Weights as safetensors with the spec (and `extra`) as metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(path), metadata={"spec": json.dumps(head.spec.to_json()), "extra": json.dumps(extra or {})})


def load_dense_head(path: Path) -> DenseHead:
    """Rebuild a saved dense head from its file alone (ValueError for another kind of file)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "spec" not in meta or "out_channels" not in meta["spec"]:
        raise ValueError(f"{path} is not a saved dense head (no dense 'spec' metadata)")
    head = build_dense_head(DenseSpec.from_json(json.loads(meta["spec"])))
    head.load_state_dict(load_file(str(path)))
    return head.eval()
