"""The heads of "Do text-free diffusion models learn discriminative visual representations?"
(diffssl) exactly as in its official code, github.com/soumik-kanad/diffssl: `ssl_diff/head.py`
(linear and MLP), `ssl_diff/attention_fusion.py` + `ssl_diff/attention_head.py` (attention head and
DifFormer), with the defaults of `scripts/linear.sh`, `scripts/attention.sh` and `scripts/fusion.sh`. Our own heads of the same
names (modules.py) follow the paper's text and stay the default; these are for reproducing the
paper, and `from_official_state_dict` loads the official checkpoints' head weights into them.

- `diffssl-linear`: AdaptiveAvgPool2d(pre_pool_size) (also when that is larger than the map), flatten
  in (C, h, w) order, Linear. No normalisation.
- `diffssl-mlp`: the same with hidden Linear + ReLU layers of widths `head_arc` ("h1_h2_..."), no dropout.
- `diffssl-attention`: AdaptiveAvgPool2d(min(side, pre_pool_size)), LayerNorm over the whole pooled
  map [C, h, w] (norm_type layer) or BatchNorm2d(C) (batch), 1x1 conv (with bias) to `width`
  tokens in (h w) order, a CLS token initialised to zeros and put first, no positional embedding,
  `depth` pre-norm blocks (LayerNorm, multi-head self-attention with qkv without bias and a
  projection with bias, LayerNorm, MLP Linear-GELU-Linear of width int(width * mlp_ratio); no
  dropout, no drop path), no final LayerNorm, Linear classifier on the CLS output.
- `diffssl-difformer`: the same over a grid of timesteps x blocks: one tokenizer per block (shared
  by the timesteps), for each timestep the tokens of all blocks in the given block order behind one
  CLS through the shared blocks, the CLS outputs of all timesteps concatenated into the classifier.
All weights keep PyTorch's default initialisation, as the official code does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipelines.heads.modules import Features, Head, HeadSpec, build_head


def hidden_widths(head_arc: str) -> list[int]:
    """The hidden widths of an official `--head_arc` string: "" -> [], "1024" -> [1024],
    "1024_512" -> [1024, 512]. ValueError on anything else."""
    if not head_arc:
        return []
    if not re.fullmatch(r"[1-9][0-9]*(_[1-9][0-9]*)*", head_arc):
        raise ValueError(f"--head-arc takes positive widths joined by '_' (e.g. 1024 or 2048_1024), got {head_arc!r}")
    return [int(w) for w in head_arc.split("_")]


def check_spec(spec: HeadSpec) -> None:
    """Refuse a diffssl-* spec whose options do not fit its kind (called by HeadSpec)."""
    kind = spec.kind
    attention = kind in ("diffssl-attention", "diffssl-difformer")
    if attention and spec.head_arc:
        raise ValueError(f"--head-arc sets the hidden widths of diffssl-mlp, not {kind}")
    if kind == "diffssl-linear" and spec.head_arc:
        raise ValueError(f"diffssl-linear has no hidden layer: for --head-arc {spec.head_arc} use --head diffssl-mlp")
    if kind == "diffssl-mlp" and not spec.head_arc:
        raise ValueError("diffssl-mlp needs --head-arc (hidden widths, e.g. 1024 or 2048_1024; the official code has no default)")
    hidden_widths(spec.head_arc)
    if not attention and (spec.norm_type is not None or spec.mlp_ratio is not None):
        raise ValueError(f"--norm-type and --mlp-ratio set diffssl-attention and diffssl-difformer, not {kind} (which has no norm)")
    if spec.pre_pool_size < 1:
        raise ValueError(f"--pre-pool-size must be a positive integer, got {spec.pre_pool_size}")
    if attention:
        if spec.norm_type not in ("layer", "batch"):
            raise ValueError(f"unknown --norm-type {spec.norm_type!r}; choose layer or batch")
        if not spec.mlp_ratio > 0 or int(spec.width * spec.mlp_ratio) < 1:
            raise ValueError(f"--mlp-ratio must give a positive MLP width, got {spec.mlp_ratio}")
        if spec.width % spec.num_heads:
            raise ValueError(f"--width {spec.width} must be a multiple of --attn-heads {spec.num_heads}")


class PooledHead(Head):
    """diffssl-linear and diffssl-mlp (official `Head`, ssl_diff/head.py)."""

    def __init__(self, spec: HeadSpec, text: Tensor | None = None):
        super().__init__(spec)
        ((c, _, _),) = spec.inputs.values()
        dim = c * spec.pre_pool_size ** 2
        layers: list[nn.Module] = []
        for width in hidden_widths(spec.head_arc):
            layers += [nn.Linear(dim, width), nn.ReLU()]
            dim = width
        self.hidden = nn.Sequential(*layers)
        self._set_classifier(dim, text)

    def embed(self, features: Features, expert: Features | None) -> Tensor:
        x = F.adaptive_avg_pool2d(features[self.keys[0]], self.spec.pre_pool_size)
        return self.hidden(x.flatten(1))


class SelfAttention(nn.Module):
    """Multi-head self-attention, scale head_dim^-0.5, qkv without bias, output projection with bias."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, heads, n, d / heads)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class FeedForward(nn.Module):
    """Linear, GELU (exact), Linear."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, num_heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = FeedForward(width, int(width * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Tokenizer(nn.Module):
    """(B, C, H, W) -> (B, h*w, width): pool to (min(H, p), min(W, p)), LayerNorm([C, h, w]) or
    BatchNorm2d(C), 1x1 conv (official `pre_layer` of attention_fusion.py)."""

    def __init__(self, c: int, h: int, w: int, spec: HeadSpec):
        super().__init__()
        self.size = (min(h, spec.pre_pool_size), min(w, spec.pre_pool_size))
        self.norm = nn.LayerNorm([c, *self.size]) if spec.norm_type == "layer" else nn.BatchNorm2d(c)
        self.proj = nn.Conv2d(c, spec.width, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(self.norm(F.adaptive_avg_pool2d(x, self.size)))
        return x.flatten(2).transpose(1, 2)


class AttentionFusion(Head):
    """diffssl-attention (one timestep, one block) and diffssl-difformer: official `AttentionFusion`.
    Each timestep goes through the tokenizers and the blocks on its own, as in the official code
    (with --norm-type batch, the batch statistics are those of one timestep)."""

    def __init__(self, spec: HeadSpec, text: Tensor | None = None):
        super().__init__(spec)
        self.timesteps = list(dict.fromkeys(t for t, _ in spec.inputs))
        self.block_names = list(dict.fromkeys(b for _, b in spec.inputs))
        missing = [(t, b) for t in self.timesteps for b in self.block_names if (t, b) not in spec.inputs]
        if missing:
            raise ValueError(f"the {spec.kind} head needs every (timestep, block) of its grid; missing {missing}")
        self.tokenizers = nn.ModuleList(Tokenizer(*spec.inputs[(self.timesteps[0], b)], spec) for b in self.block_names)
        self.cls = nn.Parameter(torch.zeros(1, 1, spec.width))
        self.blocks = nn.Sequential(*(Block(spec.width, spec.num_heads, spec.mlp_ratio) for _ in range(spec.depth)))
        self._set_classifier(spec.width * len(self.timesteps), text)

    def embed(self, features: Features, expert: Features | None) -> Tensor:
        out = []
        for t in self.timesteps:
            tokens = torch.cat([tok(features[(t, b)]) for tok, b in zip(self.tokenizers, self.block_names)], dim=1)
            x = torch.cat([self.cls.expand(len(tokens), -1, -1), tokens], dim=1)
            out.append(self.blocks(x)[:, 0])
        return torch.cat(out, dim=1)


DIFFSSL_HEADS: dict[str, type[Head]] = {
    "diffssl-linear": PooledHead, "diffssl-mlp": PooledHead, "diffssl-attention": AttentionFusion,
    "diffssl-difformer": AttentionFusion,
}


def from_official_state_dict(kind: str, official: Mapping[str, Tensor],
                             block_order: Sequence[str] | None = None) -> dict[str, Tensor]:
    """The official head weights (`checkpoint["model_head"]` of diffssl's finetune.py, i.e. the
    state dict of its `Head` or `AttentionFusion`) renamed to the keys of our diffssl-* head of
    `kind`; load the result with `head.load_state_dict(...)`.

    Official layouts: Head: `fcs.{i}.{weight,bias}` (the last one is the classifier).
    AttentionFusion: `pre_layer.{block}.1.*` (norm), `pre_layer.{block}.2.*` (1x1 conv),
    `intra_inter_block_attention.cls_token`, `intra_inter_block_attention.layers.{j}.*` (the blocks, j
    counting the parameter-free layers of its layer string too), `head.*` (classifier).
    `block_order`: the official block numbers (e.g. ["19", "24", "30"]) in the order of our head's
    blocks (its --block order); default: increasing block number, the order of scripts/fusion.sh.
    ValueError on a key of no known place, on a block_order that is not the checkpoint's blocks, or
    on a fusion (several blocks) checkpoint for diffssl-attention."""
    out: dict[str, Tensor] = {}
    if kind in ("diffssl-linear", "diffssl-mlp"):
        fcs = sorted({int(m.group(1)) for k in official if (m := re.fullmatch(r"fcs\.(\d+)\.(weight|bias)", k))})
        for key, value in official.items():
            m = re.fullmatch(r"fcs\.(\d+)\.(weight|bias)", key)
            if m is None:
                raise ValueError(f"unexpected key {key!r} in an official linear/MLP head (expected fcs.<i>.weight|bias)")
            i, param = int(m.group(1)), m.group(2)
            out[f"classifier.{param}" if i == fcs[-1] else f"hidden.{2 * i}.{param}"] = value
        return out
    if kind not in DIFFSSL_HEADS:
        raise ValueError(f"no official layout for head {kind!r}; diffssl heads: {', '.join(DIFFSSL_HEADS)}")
    found = {m.group(1) for k in official if (m := re.match(r"pre_layer\.([^.]+)\.", k))}
    if kind == "diffssl-attention" and len(found) != 1:
        raise ValueError(f"an official attention head reads one block, this checkpoint has pre_layers {sorted(found)}: "
                         "load it into diffssl-difformer")
    blocks = list(block_order) if block_order is not None else sorted(found, key=int)
    if sorted(blocks) != sorted(found):
        raise ValueError(f"block_order {blocks} is not the checkpoint's blocks {sorted(found, key=int)}")
    layers = sorted({int(m.group(1)) for k in official
                     if (m := re.match(r"intra_inter_block_attention\.layers\.(\d+)\.", k))})
    for key, value in official.items():
        if m := re.fullmatch(r"pre_layer\.([^.]+)\.([12])\.(.+)", key):
            out[f"tokenizers.{blocks.index(m.group(1))}.{'norm' if m.group(2) == '1' else 'proj'}.{m.group(3)}"] = value
        elif key == "intra_inter_block_attention.cls_token":
            out["cls"] = value
        elif m := re.fullmatch(r"intra_inter_block_attention\.layers\.(\d+)\.(.+)", key):
            out[f"blocks.{layers.index(int(m.group(1)))}.{m.group(2)}"] = value
        elif m := re.fullmatch(r"head\.(weight|bias)", key):
            out[f"classifier.{m.group(1)}"] = value
        else:
            raise ValueError(f"unexpected key {key!r} in an official attention head")
    return out


OFFICIAL_FUSION_ARC = "Use_CLS_Token:True:1024,Insert_CLS_Token,Attention:1024:8:4:2,Extract_CLS_Token"


def parse_fusion_arc(fusion_arc: str) -> dict[str, int | float]:
    """The transformer sizes of an official `--fusion_arc` layer string (attention_head.py), e.g.
    scripts/attention.sh's "Use_CLS_Token:True:1024,Insert_CLS_Token,Attention:1024:8:4:2,Extract_CLS_Token"
    -> {"width": 1024, "num_heads": 8, "mlp_ratio": 4.0, "depth": 2}. Only that layout (a CLS token,
    Attention:dim:heads:mlp_ratio:blocks, the CLS output) is the diffssl-attention head; ValueError on
    any other string (Pool, Reshape, Dense, ... layers have no place in it)."""
    m = re.fullmatch(r"Use_CLS_Token:True:(\d+),Insert_CLS_Token,Attention:(\d+):(\d+):([0-9.]+):(\d+),Extract_CLS_Token",
                     fusion_arc.replace(" ", ""))
    if m is None or m.group(1) != m.group(2):
        raise ValueError(f"--fusion-arc {fusion_arc!r} is not of the form Use_CLS_Token:True:D,Insert_CLS_Token,"
                         "Attention:D:HEADS:MLP_RATIO:DEPTH,Extract_CLS_Token (the official scripts' layout)")
    return {"width": int(m.group(2)), "num_heads": int(m.group(3)), "mlp_ratio": float(m.group(4)),
            "depth": int(m.group(5))}


def head_from_official(spec: HeadSpec, official: Mapping[str, Tensor], block_order: Sequence[str] | None = None) -> Head:
    """Our diffssl-* head of `spec` holding the official head weights `official` (see
    `from_official_state_dict`). ValueError, in one line, when a weight is missing, extra or of
    another shape than `spec` gives (wrong --input-shape, --pre-pool-size, --head-arc, ...)."""
    if any(not isinstance(v, Tensor) for v in official.values()):
        raise ValueError("the checkpoint's 'model_head' is not a state dict of tensors")
    attention = any(k.startswith("pre_layer.") for k in official)
    if attention != (spec.kind in ("diffssl-attention", "diffssl-difformer")):
        found = "an attention head (pre_layer.*)" if attention else "a linear/MLP head (fcs.*)"
        raise ValueError(f"the checkpoint holds {found}, not a {spec.kind} head: check --head-type")
    ours = from_official_state_dict(spec.kind, official, block_order)
    head = build_head(spec)
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.items()}
    if missing := sorted(set(expected) - set(got)):
        raise ValueError(f"the checkpoint has no weights for {missing[:3]} of a {spec.kind} head: check --head-type, "
                         "--head-arc, --fusion-arc")
    if extra := sorted(set(got) - set(expected)):
        raise ValueError(f"the checkpoint has weights {extra[:3]} that a {spec.kind} head of these options lacks: "
                         "check --head-arc, --fusion-arc")
    if wrong := [k for k in expected if expected[k] != got[k]]:
        k = wrong[0]
        raise ValueError(f"checkpoint weight for {k} is {got[k]}, a {spec.kind} head of these options has {expected[k]}: "
                         "check --input-shape, --pre-pool-size, --norm-type, --fusion-arc, --num-classes")
    head.load_state_dict(ours)
    return head.eval()
