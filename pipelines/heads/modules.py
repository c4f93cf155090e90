"""The trainable probe heads: small torch modules over cached block activations.

Every head maps the probed run's features, a dict {(timestep, block): (B, C, H, W) float tensor},
to class logits; the uhead also reads an expert run's maps (`expert`, keyed the same way). A head
is fully described by its `HeadSpec` (kind, inputs and their shapes, sizes, classifier), which is
saved beside its weights so that `load_head` can rebuild it without the store.

Kinds:
- `linear` / `mlp`: adaptive average pool to `pool` x `pool`, LayerNorm over channels, flatten,
  (mlp: one hidden layer), classifier.
- `attention`: the attention head of "Do text-free diffusion models learn discriminative visual
  representations?": tokenizer, learned CLS token, pre-norm transformer encoder, classifier on CLS.
- `difformer`: the same paper's fusion head over several blocks and timesteps.
- `uhead`: Vermouth's U-head, a feature pyramid with an optional adapted expert.
- `diffssl-linear`, `diffssl-mlp`, `diffssl-attention`, `diffssl-difformer`: the same paper's heads
  exactly as in its official code (pipelines/heads/diffssl.py); the kinds above are ours and the default.
- `vermouth-uhead`: Vermouth's U-head exactly as in its official code (pipelines/heads/vermouth.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Key = tuple[int | None, str]  # (timestep, block); None is the timestep of experts
Shape = tuple[int, int, int]  # (C, H, W)
Features = Mapping[Key, Tensor]

DIFFSSL_KINDS = ("diffssl-linear", "diffssl-mlp", "diffssl-attention", "diffssl-difformer")
EXPERT_KINDS = ("uhead", "vermouth-uhead")  # the heads that read an expert run
OFFICIAL_KINDS = (*DIFFSSL_KINDS, "vermouth-uhead")  # the papers' own heads, with their official options
KINDS = ("linear", "mlp", "attention", "difformer", "uhead", *OFFICIAL_KINDS)
SINGLE_INPUT_KINDS = ("linear", "mlp", "attention", "diffssl-linear", "diffssl-mlp", "diffssl-attention")
# Sizes left unset (None) in a HeadSpec take these; the diffssl-* values are the official code's
# (scripts/linear.sh: --pre_pool_size 2; scripts/attention.sh and fusion.sh: --pre_pool_size 16,
# --norm_type layer, fusion_arc Attention:1024:8:4:2, i.e. width 1024, 8 heads, MLP ratio 4, depth 2).
DEFAULT_SIZES: dict[str, dict] = {
    "linear": {}, "mlp": {}, "attention": {}, "difformer": {}, "uhead": {},
    "diffssl-linear": {"pre_pool_size": 2},
    "diffssl-mlp": {"pre_pool_size": 2},
    "diffssl-attention": {"pre_pool_size": 16, "norm_type": "layer", "mlp_ratio": 4.0, "width": 1024, "num_heads": 8},
}
DEFAULT_SIZES["diffssl-difformer"] = DEFAULT_SIZES["diffssl-attention"]
# Vermouth's Classification/train_few-shot.py: --fuse_arch tiny, --temperature 0.2; 8 heads in its AttentionPool2d.
DEFAULT_SIZES["vermouth-uhead"] = {"fuse_arch": "tiny", "num_heads": 8, "temperature": 0.2}
OUR_SIZES = {"width": 128, "num_heads": 4, "temperature": 0.07}
# The architecture options each head reads (HeadSpec field -> its probe option); any other must keep
# its default for that head, so that a saved spec never records an option the head ignored.
OPTIONS = {"pool": "--pool", "hidden": "--hidden", "width": "--width", "depth": "--depth", "num_heads": "--attn-heads",
           "expert_width": "--expert-width", "pooling": "--pooling", "pre_pool_size": "--pre-pool-size",
           "head_arc": "--head-arc", "norm_type": "--norm-type", "mlp_ratio": "--mlp-ratio", "fuse_arch": "--fuse-arch"}
_TRANSFORMER = ("width", "depth", "num_heads")
_DIFFSSL_TRANSFORMER = ("pre_pool_size", "norm_type", "mlp_ratio", *_TRANSFORMER)
READS: dict[str, tuple[str, ...]] = {
    "linear": ("pool",), "mlp": ("pool", "hidden"), "attention": _TRANSFORMER, "difformer": _TRANSFORMER,
    "uhead": ("width", "num_heads", "expert_width", "pooling"),
    "diffssl-linear": ("pre_pool_size",), "diffssl-mlp": ("pre_pool_size", "head_arc"),
    "diffssl-attention": _DIFFSSL_TRANSFORMER, "diffssl-difformer": _DIFFSSL_TRANSFORMER,
    "vermouth-uhead": ("fuse_arch", "num_heads"),
}
DIFFORMER_TIMESTEPS = (90, 150, 300)  # the paper's defaults (ADM-256 block numbering)
DIFFORMER_BLOCKS = ("b19", "b24", "b30")
MAX_TOKEN_SIDE = 16


@dataclass
class HeadSpec:
    """Everything that decides a head's architecture (not its training): saved with its weights."""

    kind: str
    inputs: dict[Key, Shape]  # the probed run's maps, in the order given
    num_classes: int
    expert_inputs: dict[Key, Shape] = field(default_factory=dict)  # uhead only
    classifier: str = "linear"  # linear | cosine (against fixed text embeddings)
    text_dim: int | None = None  # cosine: width of the text embeddings
    temperature: float | None = None  # cosine: logits are cosines / temperature (0.07; vermouth-uhead 0.2)
    pool: int = 4  # linear, mlp: pooled side
    hidden: int = 256  # mlp: hidden width
    width: int | None = None  # attention, difformer: token width d; uhead: pyramid width (128; diffssl-attention 1024)
    depth: int = 2  # attention, difformer, diffssl-attention: transformer layers
    num_heads: int | None = None  # attention, difformer, uhead's attention pooling (4; diffssl-attention 8)
    expert_width: int = 32  # uhead: channels of each adapted expert map
    pooling: str = "attention"  # uhead: attention (learned query) | conv (1x1 conv + mean)
    pre_pool_size: int | None = None  # diffssl-*: adaptive average pool side (linear, mlp 2; attention 16)
    head_arc: str = ""  # diffssl-mlp: hidden widths "h1_h2_..." (official --head_arc)
    norm_type: str | None = None  # diffssl-attention: layer | batch (official --norm_type)
    mlp_ratio: float | None = None  # diffssl-attention: transformer MLP width / token width (4)
    fuse_arch: str | None = None  # vermouth-uhead: tiny | pico | small (official --fuse_arch, tiny)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown head {self.kind!r}; heads: {', '.join(KINDS)}")
        for name, value in {**OUR_SIZES, **DEFAULT_SIZES[self.kind]}.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.kind in DIFFSSL_KINDS:
            from pipelines.heads.diffssl import check_spec

            check_spec(self)
        if self.kind == "vermouth-uhead":
            from pipelines.heads.vermouth import check_spec as check_vermouth

            check_vermouth(self)
        defaults = {**{f.name: f.default for f in fields(self)}, **OUR_SIZES, **DEFAULT_SIZES[self.kind]}
        ignored = [f"{option} {getattr(self, name)}" for name, option in OPTIONS.items()
                   if name not in READS[self.kind] and getattr(self, name) not in (None, defaults[name])]
        if ignored:
            raise ValueError(f"{', '.join(ignored)}: not an option of the {self.kind} head (it takes "
                             f"{', '.join(OPTIONS[name] for name in READS[self.kind])})")
        if self.kind in SINGLE_INPUT_KINDS and len(self.inputs) != 1:
            raise ValueError(f"a {self.kind} head reads one (timestep, block), got {len(self.inputs)}")
        blocks = {block for _, block in self.inputs}
        if self.kind in ("difformer", "uhead") and len(blocks) < 2:
            raise ValueError(f"the {self.kind} head fuses several blocks: give at least two --block (got {sorted(blocks)})")
        if self.expert_inputs and self.kind not in EXPERT_KINDS:
            raise ValueError(f"only the {' and '.join(EXPERT_KINDS)} read an expert run, not {self.kind}")
        if self.classifier not in ("linear", "cosine"):
            raise ValueError(f"unknown classifier {self.classifier!r}; choose linear or cosine")
        if self.classifier == "cosine" and self.text_dim is None:
            raise ValueError("the cosine classifier needs text embeddings (--text-embeddings)")
        if self.pooling not in ("attention", "conv"):
            raise ValueError(f"unknown uhead pooling {self.pooling!r}; choose attention or conv")
        sizes = {"--pool": self.pool, "--hidden": self.hidden, "--width": self.width, "--depth": self.depth,
                 "--attn-heads": self.num_heads, "--expert-width": self.expert_width}
        small = [f"{option} {value}" for option, value in sizes.items() if value < 1]
        if small:
            raise ValueError(f"head sizes must be positive integers, got {', '.join(small)}")
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be positive (logits are cosines / T), got {self.temperature}")

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["inputs"] = [[t, b, list(s)] for (t, b), s in self.inputs.items()]
        doc["expert_inputs"] = [[t, b, list(s)] for (t, b), s in self.expert_inputs.items()]
        return doc

    @classmethod
    def from_json(cls, doc: Mapping) -> HeadSpec:
        def shapes(items: list) -> dict[Key, Shape]:
            return {(t, b): tuple(s) for t, b, s in items}

        return cls(**{**doc, "inputs": shapes(doc["inputs"]), "expert_inputs": shapes(doc["expert_inputs"])})


# -- building blocks ------------------------------------------------------------------------------
def conv_block(c_in: int, c_out: int, kernel: int) -> nn.Sequential:
    """Conv + GroupNorm + SiLU, the unit of the uhead's levels, fusions and adapters. Up to 32
    groups of at least 8 channels: a group of one channel would subtract each channel's spatial
    mean, and with it any class signal carried by a channel's overall level."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2),
        nn.GroupNorm(math.gcd(32, c_out, max(1, c_out // 8)), c_out),
        nn.SiLU(),
    )


def resized(x: Tensor, size: tuple[int, int]) -> Tensor:
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class Tokenizer(nn.Module):
    """(B, C, H, W) -> (B, tokens, width): average-pool only maps larger than 16x16 (to 16x16, so
    attention cost stays bounded), LayerNorm over channels (block activations differ in scale by
    orders of magnitude), then a 1x1 conv to width (a Linear on channels-last tokens)."""

    def __init__(self, shape: Shape, width: int):
        super().__init__()
        c, h, w = shape
        self.size = (min(h, MAX_TOKEN_SIDE), min(w, MAX_TOKEN_SIDE))
        self.norm = nn.LayerNorm(c)
        self.proj = nn.Linear(c, width)

    @property
    def n_tokens(self) -> int:
        return self.size[0] * self.size[1]

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.size:
            x = F.adaptive_avg_pool2d(x, self.size)
        return self.proj(self.norm(x.flatten(2).transpose(1, 2)))


class Encoder(nn.Module):
    """A learned CLS token and positional embedding, a pre-norm transformer; returns the CLS output.
    No dropout: training stays deterministic, so a head trained in a grid equals the head alone."""

    def __init__(self, n_tokens: int, width: int, depth: int, num_heads: int):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, n_tokens + 1, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, num_heads, dim_feedforward=4 * width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: Tensor) -> Tensor:
        x = torch.cat([self.cls.expand(len(tokens), -1, -1), tokens], dim=1) + self.pos
        return self.norm(self.layers(x)[:, 0])


class CosineClassifier(nn.Module):
    """logits_k = <normalize(f W), normalize(text_k)> / T against FIXED embeddings of the class
    names: the head only learns the projection W into the text space."""

    def __init__(self, dim: int, text: Tensor, temperature: float):
        super().__init__()
        self.proj = nn.Linear(dim, text.shape[1], bias=False)
        self.register_buffer("text", F.normalize(text.float(), dim=1))
        self.temperature = temperature

    def forward(self, f: Tensor) -> Tensor:
        return F.normalize(self.proj(f), dim=1) @ self.text.T / self.temperature


class AttentionPool(nn.Module):
    """A learned query attends over the positions of a map: the head chooses where to look."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.norm = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, num_heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.norm(x.flatten(2).transpose(1, 2))
        out, _ = self.attn(self.query.expand(len(x), -1, -1), tokens, tokens, need_weights=False)
        return out[:, 0]


class ConvPool(nn.Module):
    """A 1x1 conv projection, then the mean over positions."""

    def __init__(self, width: int):
        super().__init__()
        self.proj = conv_block(width, width, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).mean(dim=(2, 3))


# -- heads ----------------------------------------------------------------------------------------
class Head(nn.Module):
    """Base of every head: `embed` (one vector per image) then the spec's classifier."""

    def __init__(self, spec: HeadSpec):
        super().__init__()
        self.spec = spec
        self.keys: list[Key] = list(spec.inputs)
        self.expert_keys: list[Key] = list(spec.expert_inputs)

    def _set_classifier(self, dim: int, text: Tensor | None) -> None:
        spec = self.spec
        if spec.classifier == "linear":
            self.classifier = nn.Linear(dim, spec.num_classes)
            return
        if text is None:  # rebuilt from a file: the buffer comes with the weights
            text = torch.zeros(spec.num_classes, spec.text_dim)
        if tuple(text.shape) != (spec.num_classes, spec.text_dim):
            raise ValueError(f"text embeddings of shape {tuple(text.shape)}, expected ({spec.num_classes}, {spec.text_dim})")
        self.classifier = CosineClassifier(dim, text, spec.temperature)

    def embed(self, features: Features, expert: Features | None) -> Tensor:
        raise NotImplementedError

    def forward(self, features: Features, expert: Features | None = None) -> Tensor:
        return self.classifier(self.embed(features, expert))


class PooledHead(Head):
    """linear and mlp: pooled map, LayerNorm over channels (one learning rate then suits blocks of
    any scale), flattened; mlp adds one GELU hidden layer."""

    def __init__(self, spec: HeadSpec, text: Tensor | None = None):
        super().__init__(spec)
        ((c, h, w),) = spec.inputs.values()
        self.size = (min(spec.pool, h), min(spec.pool, w))
        self.norm = nn.LayerNorm(c)
        dim = c * self.size[0] * self.size[1]
        if spec.kind == "mlp":
            self.hidden = nn.Sequential(nn.Linear(dim, spec.hidden), nn.GELU())
            dim = spec.hidden
        else:
            self.hidden = nn.Identity()
        self._set_classifier(dim, text)

    def embed(self, features: Features, expert: Features | None) -> Tensor:
        x = F.adaptive_avg_pool2d(features[self.keys[0]], self.size)
        x = self.norm(x.permute(0, 2, 3, 1))
        return self.hidden(x.flatten(1))


class AttentionHead(Head):
    """Tokens of one map, CLS, L encoder layers, classifier on CLS."""

    def __init__(self, spec: HeadSpec, text: Tensor | None = None):
        super().__init__(spec)
        (shape,) = spec.inputs.values()
        self.tokenizer = Tokenizer(shape, spec.width)
        self.encoder = Encoder(self.tokenizer.n_tokens, spec.width, spec.depth, spec.num_heads)
        self._set_classifier(spec.width, text)

    def embed(self, features: Features, expert: Features | None) -> Tensor:
        return self.encoder(self.tokenizer(features[self.keys[0]]))


class DifFormer(Head):
    """Fusion over blocks and timesteps. For each t, the tokens of all blocks (one tokenizer per
    block, shared over t, since blocks differ in channels) are concatenated and go through one
    transformer shared by all t; the CLS outputs of all t are concatenated into the classifier, so
    the classifier still tells the timesteps apart. Inputs must be the full grid timesteps x blocks."""

    def __init__(self, spec: HeadSpec, text: Tensor | None = None):
        super().__init__(spec)
        self.timesteps = list(dict.fromkeys(t for t, _ in spec.inputs))
        self.blocks = list(dict.fromkeys(b for _, b in spec.inputs))
        missing = [(t, b) for t in self.timesteps for b in self.blocks if (t, b) not in spec.inputs]
        if missing:
            raise ValueError(f"the difformer needs every (timestep, block) of its grid; missing {missing}")
        shapes = [spec.inputs[(self.timesteps[0], b)] for b in self.blocks]
        self.tokenizers = nn.ModuleList(Tokenizer(s, spec.width) for s in shapes)
        n_tokens = sum(tok.n_tokens for tok in self.tokenizers)
        self.encoder = Encoder(n_tokens, spec.width, spec.depth, spec.num_heads)
        self._set_classifier(spec.width * len(self.timesteps), text)

    def embed(self, features: Features, expert: Features | None) -> Tensor:
        per_t = [torch.cat([tok(features[(t, b)]) for tok, b in zip(self.tokenizers, self.blocks)], dim=1)
                 for t in self.timesteps]
        cls = self.encoder(torch.cat(per_t))  # all t in one batch through the shared transformer
        return torch.cat(cls.chunk(len(self.timesteps)), dim=1)


class UHead(Head):
    """Vermouth's U-head. Levels are ordered from COARSE to FINE (smallest map first, like a UNet
    decoder): each level is Conv3x3+GroupNorm+SiLU to `width`; the running output is resampled
    (bilinear) to the next level's size, concatenated with it and fused by another conv block.
    The finest output is pooled by a learned query (`attention`) or a 1x1 conv + mean (`conv`).

    Adapted expert: each expert map (e.g. a ResNet stage, another run of the store) goes through its
    own adapter (1x1 conv + GroupNorm + SiLU to `expert_width`), is resampled to each level's size
    and concatenated with that level's input."""

    def __init__(self, spec: HeadSpec, text: Tensor | None = None):
        super().__init__(spec)
        self.levels = sorted(spec.inputs, key=lambda k: spec.inputs[k][1] * spec.inputs[k][2])
        self.adapters = nn.ModuleList(conv_block(c, spec.expert_width, 1) for c, _, _ in spec.expert_inputs.values())
        extra = spec.expert_width * len(spec.expert_inputs)
        self.level_convs = nn.ModuleList(conv_block(spec.inputs[k][0] + extra, spec.width, 3) for k in self.levels)
        self.fuse = nn.ModuleList(conv_block(2 * spec.width, spec.width, 3) for _ in self.levels[1:])
        self.pool = AttentionPool(spec.width, spec.num_heads) if spec.pooling == "attention" else ConvPool(spec.width)
        self._set_classifier(spec.width, text)

    def embed(self, features: Features, expert: Features | None) -> Tensor:
        if self.expert_keys and expert is None:
            raise ValueError("this uhead was built with an expert: pass the expert run's features")
        adapted = [adapter(expert[k]) for adapter, k in zip(self.adapters, self.expert_keys)]
        out = None
        for i, key in enumerate(self.levels):
            x = features[key]
            size = tuple(x.shape[-2:])
            x = self.level_convs[i](torch.cat([x, *(resized(a, size) for a in adapted)], dim=1))
            out = x if out is None else self.fuse[i - 1](torch.cat([resized(out, size), x], dim=1))
        return self.pool(out)


HEADS: dict[str, type[Head]] = {
    "linear": PooledHead, "mlp": PooledHead, "attention": AttentionHead, "difformer": DifFormer, "uhead": UHead,
}


def build_head(spec: HeadSpec, text: Tensor | None = None) -> Head:
    """The head of `spec`; `text` (num_classes, text_dim) for the cosine classifier."""
    if spec.kind in DIFFSSL_KINDS:  # imported here: that module builds on Head above
        from pipelines.heads.diffssl import DIFFSSL_HEADS

        return DIFFSSL_HEADS[spec.kind](spec, text)
    if spec.kind == "vermouth-uhead":
        from pipelines.heads.vermouth import VERMOUTH_HEADS

        return VERMOUTH_HEADS[spec.kind](spec, text)
    return HEADS[spec.kind](spec, text)


def save_head(head: Head, path: Path, extra: Mapping | None = None) -> None:
    """Weights as safetensors, with the spec (and `extra`, e.g. the training config) as metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(path), metadata={"spec": json.dumps(head.spec.to_json()), "extra": json.dumps(extra or {})})


def load_head(path: Path) -> Head:
    """Rebuild a saved head from its file alone."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "spec" not in meta:
        raise ValueError(f"{path} is not a saved head (no 'spec' metadata)")
    head = build_head(HeadSpec.from_json(json.loads(meta["spec"])))
    head.load_state_dict(load_file(str(path)))
    return head.eval()
