"""Vermouth's U-head exactly as in its official code, github.com/develop-productivity/Vermouth:
`Classification/models/classifier.py` (FuseClassifier), `src/model/modules.py` (SimpleFuse,
FuseBlock, AttentionPool2d, Adapter) and `Classification/models/model.py` (DiffusionClassifier:
expert concatenation, cosine classifier), with the defaults of `Classification/train_few-shot.py`
(--fuse_arch tiny, --temperature 0.2). Our `uhead` (modules.py) stays the default; this one is for
reproducing the paper, and `from_official_state_dict` loads official weights into it.

`vermouth-uhead` reads four maps of one timestep, ordered here from COARSE to FINE by area (the
official low_res, mid_res, high_res, highest_res); each finer map, 2x2 average pooled (stride 2,
floor), must have the next coarser map's size: the official code concatenates without resampling.
- Fusion (high2low): the finest map -> FuseBlock -> AvgPool 2x2 -> concatenated after the next
  coarser map -> its FuseBlock -> ... -> the coarsest map's FuseBlock (no pool after it), then
  AdaptiveAvgPool2d(4) when its side is not 4.
- FuseBlock: Conv 1x1 without bias, GroupNorm(32), SiLU; `fuse_arch` small adds a residual stage
  (Conv kxk without bias, k = 1 on the two coarse levels and 3 (padding 1) on the two fine ones,
  GroupNorm(32), SiLU; out = act(out + stage2(out))). Output widths coarse to fine: tiny and
  small [1024, 768, 512, 256], pico [256, 256, 256, 256].
- AttentionPool2d (CLIP's): the mean token first, a learned positional embedding of 4*4+1 tokens,
  multi-head attention (`num_heads`, official 8) with separate q/k/v projections with bias, the
  mean token's output projected to 768 (CLIP ViT-L/14's text width).
- Classifier: cosine of the L2-normalised 768-vector against the fixed, L2-normalised text
  embeddings (the official code averages the CLIP text embeddings of a class's prompt templates,
  then normalises), logits = cosine / temperature. No learned projection, no dropout anywhere.
- Expert (optional, three maps coarse to fine, the official ResNet-18 layer4, layer3, layer2):
  each through a bias-free bottleneck adapter (Conv 1x1 C -> C/4, ReLU, Conv 1x1 C/4 -> C); then,
  at levels 2-4 (mid, high, highest) only, the diffusion map and the adapted expert map, each
  L2-normalised over channels, are concatenated (diffusion first); the expert map must have its
  level's size. Without an expert nothing is normalised.
- Initialisation: FuseBlock convs Kaiming-normal (fan-in, gain sqrt 2), GroupNorm ones/zeros;
  the attention pool (built outside SimpleFuse in the official code) keeps PyTorch's defaults and
  a positional embedding N(0, 1)/sqrt(C); the adapters keep PyTorch's default conv init.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipelines.heads.modules import Features, Head, HeadSpec, Key, build_head

FUSE_WIDTHS = {"tiny": [1024, 768, 512, 256], "pico": [256, 256, 256, 256], "small": [1024, 768, 512, 256]}
CLIP_DIM = 768  # the official clip_feature: the attention pool's output, the text embeddings' width
OUT_SIDE = 4  # the official out_res: the attention pool's grid side
OFFICIAL_LEVELS = ("low_res_conv", "mid_res_conv", "high_res_conv", "highest_res_conv")  # coarse to fine


def by_area(inputs: Mapping[Key, tuple[int, int, int]]) -> list[Key]:
    """Keys from the smallest map to the largest (stable for equal areas)."""
    return sorted(inputs, key=lambda k: inputs[k][1] * inputs[k][2])


def check_spec(spec: HeadSpec) -> None:
    """Refuse a vermouth-uhead spec the official head cannot be built for (called by HeadSpec)."""
    if spec.fuse_arch not in FUSE_WIDTHS:
        raise ValueError(f"unknown --fuse-arch {spec.fuse_arch!r}; choose {', '.join(FUSE_WIDTHS)}")
    if spec.classifier != "cosine" or spec.text_dim != CLIP_DIM:
        raise ValueError(f"vermouth-uhead classifies by cosine against {CLIP_DIM}-wide CLIP text embeddings only: "
                         f"give --classifier cosine --text-embeddings FILE with {CLIP_DIM} columns")
    if len(spec.inputs) != 4 or len({t for t, _ in spec.inputs}) != 1:
        raise ValueError(f"vermouth-uhead reads four blocks of one timestep (its four levels), got "
                         f"{[list(k) for k in spec.inputs]}")
    levels = by_area(spec.inputs)
    sides = [spec.inputs[k][1:] for k in levels]
    for coarse, fine in zip(sides, sides[1:]):
        if (fine[0] // 2, fine[1] // 2) != tuple(coarse):
            raise ValueError(f"vermouth-uhead fuses by 2x2 average pooling: each level must halve the next finer one, "
                             f"got sides {[list(s) for s in sides]} (H, W) coarse to fine")
    if spec.expert_inputs:
        experts = by_area(spec.expert_inputs)
        if len(experts) != 3:
            raise ValueError(f"the vermouth-uhead expert gives three maps (levels 2-4), got {len(experts)}: set --expert-blocks")
        for level, key in zip(levels[1:], experts):
            if spec.expert_inputs[key][1:] != spec.inputs[level][1:]:
                raise ValueError(f"expert block {key[1]} is {list(spec.expert_inputs[key][1:])} (H, W), its level "
                                 f"{level[1]} is {list(spec.inputs[level][1:])}: the official head concatenates without resampling")
            if spec.expert_inputs[key][0] < 4:
                raise ValueError(f"expert block {key[1]} has {spec.expert_inputs[key][0]} channels; the adapter needs at least 4 (C -> C/4 -> C)")


class FuseBlock(nn.Module):
    """Conv 1x1 (no bias) + GroupNorm(32) + SiLU; with `kernel` a residual second stage (fuse_arch small)."""

    def __init__(self, c_in: int, c_out: int, kernel: int | None):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.norm = nn.GroupNorm(32, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, kernel, padding=kernel // 2, bias=False) if kernel else None
        self.norm2 = nn.GroupNorm(32, c_out) if kernel else None

    def forward(self, x: Tensor) -> Tensor:
        out = F.silu(self.norm(self.conv(x)))
        if self.conv2 is not None:
            out = F.silu(out + F.silu(self.norm2(self.conv2(out))))
        return out


class MeanQueryAttentionPool(nn.Module):
    """CLIP's AttentionPool2d on a (B, C, 4, 4) map -> (B, out_dim): only the mean token's query is
    computed, since only its output is kept."""

    def __init__(self, width: int, num_heads: int, out_dim: int):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(OUT_SIDE ** 2 + 1, width) / width ** 0.5)
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.out = nn.Linear(width, out_dim)
        self.num_heads = num_heads

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1) + self.pos
        b, n, c = tokens.shape
        heads = lambda t: t.view(b, -1, self.num_heads, c // self.num_heads).transpose(1, 2)  # noqa: E731
        q, k, v = heads(self.q(tokens[:, :1])), heads(self.k(tokens)), heads(self.v(tokens))
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, c))


class TextCosine(nn.Module):
    """logits = <normalize(f), normalize(text_k)> / T, the text fixed (a buffer): nothing to learn."""

    def __init__(self, text: Tensor, temperature: float):
        super().__init__()
        self.register_buffer("text", F.normalize(text.float(), dim=1))
        self.temperature = temperature

    def forward(self, f: Tensor) -> Tensor:
        return F.normalize(f, dim=1) @ self.text.T / self.temperature


class VermouthUHead(Head):
    """The official FuseClassifier + AttentionPool2d + cosine classifier (module docstring)."""

    def __init__(self, spec: HeadSpec, text: Tensor | None = None):
        super().__init__(spec)
        self.levels = by_area(spec.inputs)
        self.keys = self.levels
        self.expert_keys = by_area(spec.expert_inputs)
        widths = FUSE_WIDTHS[spec.fuse_arch]
        expert_c = [0] + [spec.expert_inputs[k][0] for k in self.expert_keys] if self.expert_keys else [0] * 4
        kernels = [1, 1, 3, 3] if spec.fuse_arch == "small" else [None] * 4
        self.fuse = nn.ModuleList(
            FuseBlock(spec.inputs[key][0] + expert_c[i] + (widths[i + 1] if i < 3 else 0), widths[i], kernels[i])
            for i, key in enumerate(self.levels))
        for m in self.fuse.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
        self.adapters = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, c // 4, 1, bias=False), nn.ReLU(), nn.Conv2d(c // 4, c, 1, bias=False))
            for c, _, _ in (spec.expert_inputs[k] for k in self.expert_keys))
        self.pool = MeanQueryAttentionPool(widths[0], spec.num_heads, CLIP_DIM)
        if text is None:  # rebuilt from a file: the buffer comes with the weights
            text = torch.zeros(spec.num_classes, CLIP_DIM)
        if tuple(text.shape) != (spec.num_classes, CLIP_DIM):
            raise ValueError(f"text embeddings of shape {tuple(text.shape)}, expected ({spec.num_classes}, {CLIP_DIM})")
        self.classifier = TextCosine(text, spec.temperature)

    def embed(self, features: Features, expert: Features | None) -> Tensor:
        if self.expert_keys and expert is None:
            raise ValueError("this vermouth-uhead was built with an expert: pass the expert run's features")
        maps = [features[k] for k in self.levels]
        if self.expert_keys:
            adapted = [adapter(expert[k]) for adapter, k in zip(self.adapters, self.expert_keys)]
            maps[1:] = [torch.cat([F.normalize(x, dim=1), F.normalize(a, dim=1)], dim=1) for x, a in zip(maps[1:], adapted)]
        out = self.fuse[3](maps[3])
        for i in (2, 1, 0):
            out = self.fuse[i](torch.cat([maps[i], F.avg_pool2d(out, 2)], dim=1))
        if out.shape[-1] != OUT_SIDE:  # the official test: the width only
            out = F.adaptive_avg_pool2d(out, OUT_SIDE)
        return self.pool(out)


VERMOUTH_HEADS: dict[str, type[Head]] = {"vermouth-uhead": VermouthUHead}


def from_official_state_dict(official: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official weights renamed to our vermouth-uhead's keys; load with `head.load_state_dict(...)`.

    Official layout: DiffusionClassifier's state dict, `classifier.{level}.stage1.{0,1}.*` and (small)
    `classifier.{level}.stage2.{0,1}.*` (level low_res_conv ... highest_res_conv, coarse to fine),
    `attn_pool.positional_embedding`, `attn_pool.{q,k,v,c}_proj.*`, `expert.mappers.{j}.adapter.{0,2}.weight`
    (j: layer4, layer3, layer2) and the `text_features` buffer; the frozen parts whose outputs the
    store caches (`feature_extractor.*`, the expert's ResNet `expert.extracter.*`) are skipped.
    ValueError on a key of no known place."""
    out: dict[str, Tensor] = {}
    stage = {"stage1.0": "conv", "stage1.1": "norm", "stage2.0": "conv2", "stage2.1": "norm2"}
    proj = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "c_proj": "out"}
    for key, value in official.items():
        parts = key.split(".")
        if parts[0] == "feature_extractor" or key.startswith("expert.extracter."):
            continue
        if parts[0] == "classifier" and len(parts) == 5 and parts[1] in OFFICIAL_LEVELS and ".".join(parts[2:4]) in stage:
            out[f"fuse.{OFFICIAL_LEVELS.index(parts[1])}.{stage['.'.join(parts[2:4])]}.{parts[4]}"] = value
        elif key == "attn_pool.positional_embedding":
            out["pool.pos"] = value
        elif parts[0] == "attn_pool" and len(parts) == 3 and parts[1] in proj:
            out[f"pool.{proj[parts[1]]}.{parts[2]}"] = value
        elif parts[:2] == ["expert", "mappers"] and len(parts) == 6 and parts[3] == "adapter" and parts[4] in ("0", "2"):
            out[f"adapters.{parts[2]}.{parts[4]}.{parts[5]}"] = value
        elif key == "text_features":
            out["classifier.text"] = value
        else:
            raise ValueError(f"unexpected key {key!r} in an official Vermouth DiffusionClassifier state dict")
    return out


def head_from_official(spec: HeadSpec, official: Mapping[str, Tensor]) -> Head:
    """Our vermouth-uhead of `spec` holding the official weights (see `from_official_state_dict`);
    the text embeddings come from the checkpoint's `text_features` when it has them. ValueError, in
    one line, when a weight is missing, extra or of another shape than `spec` gives."""
    ours = from_official_state_dict(official)
    head = build_head(spec)
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    if "classifier.text" not in ours:
        ours["classifier.text"] = head.classifier.text
    got = {k: tuple(v.shape) for k, v in ours.items()}
    if missing := sorted(set(expected) - set(got)):
        raise ValueError(f"the checkpoint has no weights for {missing[:3]} of this vermouth-uhead: check --fuse-arch and the expert")
    if extra := sorted(set(got) - set(expected)):
        raise ValueError(f"the checkpoint has weights {extra[:3]} that this vermouth-uhead lacks: check --fuse-arch and the expert")
    if wrong := [k for k in expected if expected[k] != got[k]]:
        raise ValueError(f"checkpoint weight for {wrong[0]} is {got[wrong[0]]}, this vermouth-uhead has {expected[wrong[0]]}: "
                         "check the block shapes, --fuse-arch and the class count")
    ours["classifier.text"] = F.normalize(ours["classifier.text"].float(), dim=1)
    head.load_state_dict(ours)
    return head.eval()
