"""The diffssl-* heads against reference models written here from the official diffssl code's
description (github.com/soumik-kanad/diffssl, ssl_diff/head.py, attention_fusion.py,
attention_head.py), in the official state-dict layout: loaded through `from_official_state_dict`,
our heads give the same logits and have the same number of parameters."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from cli.main import app
from pipelines.heads.diffssl import from_official_state_dict
from pipelines.heads.modules import HeadSpec, build_head

B, K = 3, 5
KEY = (150, "b24")


# -- reference models, official key layout --------------------------------------------------------
class RefLinearHead(nn.Module):
    """ssl_diff/head.py `Head`: pool, flatten, fcs with ReLU between them."""

    def __init__(self, c: int, pre_pool: int, hidden: list[int], num_classes: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(pre_pool)
        widths = [c * pre_pool * pre_pool, *hidden, num_classes]
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x):
        x = torch.flatten(self.pool(x), start_dim=1)
        for i, fc in enumerate(self.fcs):
            x = fc(x)
            if i < len(self.fcs) - 1:
                x = torch.relu(x)
        return x


class RefAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        hd = c // self.heads
        qkv = self.qkv(x)
        out = []
        for h in range(self.heads):  # one head at a time, explicit softmax
            q = qkv[..., h * hd:(h + 1) * hd]
            k = qkv[..., c + h * hd:c + (h + 1) * hd]
            v = qkv[..., 2 * c + h * hd:2 * c + (h + 1) * hd]
            weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), dim=-1)
            out.append(weights @ v)
        return self.proj(torch.cat(out, dim=-1))


class RefMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, dim, heads, ratio):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = RefAttention(dim, heads)
        self.mlp = RefMlp(dim, int(dim * ratio))

    def forward(self, x):
        y = x + self.attn(self.norm1(x))
        return y + self.mlp(self.norm2(y))


class Step(nn.Module):
    """A parameter-free layer of the official layer string (Insert_CLS_Token, Extract_CLS_Token)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class RefAttentionStack(nn.Module):
    """attention_head.py `AttentionHead` for the layer string of scripts/attention.sh:
    Use_CLS_Token, Insert_CLS_Token, Attention:dim:heads:ratio:depth, Extract_CLS_Token."""

    def __init__(self, dim, heads, ratio, depth):
        super().__init__()
        insert = Step(lambda x: torch.cat([self.cls_token.expand(x.shape[0], 1, dim), x], dim=1))
        extract = Step(lambda x: x[:, 0])
        self.layers = nn.Sequential(insert, *(RefBlock(dim, heads, ratio) for _ in range(depth)), extract)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x):
        return self.layers(x)


class RefFusion(nn.Module):
    """attention_fusion.py `AttentionFusion`: `blocks` {official block number: (C, side)} in the
    order of the official --first_fw_b_list, `n_t` timesteps; forward takes [per t: [per block: map]]."""

    def __init__(self, blocks, n_t, pre_pool, norm_type, dim, heads, ratio, depth, num_classes):
        super().__init__()
        pre_layer = {}
        for number, (c, side) in blocks.items():
            s = min(side, pre_pool)
            norm = nn.BatchNorm2d(c) if norm_type == "batch" else nn.LayerNorm([c, s, s])
            to_tokens = Step(lambda x: x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1))
            pre_layer[number] = nn.Sequential(nn.AdaptiveAvgPool2d(s), norm, nn.Conv2d(c, dim, 1), to_tokens)
        self.pre_layer = nn.ModuleDict(pre_layer)
        self.intra_inter_block_attention = RefAttentionStack(dim, heads, ratio, depth)
        self.head = nn.Linear(dim * n_t, num_classes)

    def forward(self, maps):
        per_t = []
        for maps_of_t in maps:
            tokens = [self.pre_layer[number](x) for number, x in zip(self.pre_layer, maps_of_t)]
            per_t.append(self.intra_inter_block_attention(torch.cat(tokens, dim=1)))
        return self.head(torch.cat(per_t, dim=1))


def randomized(module: nn.Module) -> nn.Module:
    """Every parameter and BatchNorm statistic random, so that each one matters in the comparison."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        for name, buf in module.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buf.copy_(torch.rand_like(buf) + 0.5)
    return module.eval()


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def ours_loaded(ref: nn.Module, **spec_kw) -> nn.Module:
    head = build_head(HeadSpec(num_classes=K, **spec_kw))
    head.load_state_dict(from_official_state_dict(spec_kw["kind"], ref.state_dict()))  # strict: every key placed
    return head.eval()


# -- equality with the reference ------------------------------------------------------------------
@pytest.mark.parametrize(("side", "pre_pool", "head_arc"), [
    (8, 2, ""), (8, 16, ""), (6, 4, ""), (8, 2, "7"), (8, 3, "9_7_4"),
])
def test_linear_and_mlp_equal_the_official_head(side, pre_pool, head_arc):
    c = 6
    hidden = [int(w) for w in head_arc.split("_")] if head_arc else []
    ref = randomized(RefLinearHead(c, pre_pool, hidden, K))
    kind = "diffssl-mlp" if head_arc else "diffssl-linear"
    ours = ours_loaded(ref, kind=kind, inputs={KEY: (c, side, side)}, pre_pool_size=pre_pool, head_arc=head_arc)
    x = torch.randn(B, c, side, side)
    torch.testing.assert_close(ours({KEY: x}), ref(x), rtol=0, atol=1e-5)
    assert n_params(ours) == n_params(ref)


@pytest.mark.parametrize(("side", "pre_pool", "norm_type", "depth"), [
    (8, 16, "layer", 2), (8, 4, "layer", 1), (6, 16, "batch", 2), (8, 3, "batch", 3),
])
def test_attention_equals_the_official_attention_fusion(side, pre_pool, norm_type, depth):
    c, dim, heads, ratio = 6, 16, 4, 2.5
    ref = randomized(RefFusion({"24": (c, side)}, 1, pre_pool, norm_type, dim, heads, ratio, depth, K))
    ours = ours_loaded(ref, kind="diffssl-attention", inputs={KEY: (c, side, side)}, pre_pool_size=pre_pool,
                       norm_type=norm_type, width=dim, num_heads=heads, mlp_ratio=ratio, depth=depth)
    x = torch.randn(B, c, side, side) * 2 + 1
    torch.testing.assert_close(ours({KEY: x}), ref([[x]]), rtol=0, atol=1e-5)
    assert n_params(ours) == n_params(ref)
    assert sorted(ours.state_dict()) == sorted(from_official_state_dict("diffssl-attention", ref.state_dict()))


@pytest.mark.parametrize(("norm_type", "order"), [("layer", ["30", "19"]), ("batch", ["19", "30"])])
def test_difformer_equals_the_official_attention_fusion_over_blocks_and_timesteps(norm_type, order):
    """Two timesteps x two blocks of other channels and sides (b30 is pooled, b19 is not), given to
    our head in `order`; batch norm in train mode, where each timestep has its own statistics."""
    shapes = {"19": (8, 4), "30": (6, 12)}
    ref = randomized(RefFusion({b: shapes[b] for b in order}, 2, 6, norm_type, 16, 2, 4, 2, K))
    inputs = {(t, f"b{b}"): (shapes[b][0], shapes[b][1], shapes[b][1]) for t in (90, 300) for b in order}
    head = build_head(HeadSpec(kind="diffssl-difformer", inputs=inputs, num_classes=K, pre_pool_size=6,
                               norm_type=norm_type, width=16, num_heads=2))
    head.load_state_dict(from_official_state_dict("diffssl-difformer", ref.state_dict(), block_order=order))
    x = {key: torch.randn(B, *shape) for key, shape in inputs.items()}
    maps = [[x[(t, f"b{b}")] for b in order] for t in (90, 300)]
    torch.testing.assert_close(head.eval()(x), ref(maps), rtol=0, atol=1e-5)
    torch.testing.assert_close(head.train()(x), ref.train()(maps), rtol=0, atol=1e-5)
    assert n_params(head) == n_params(ref)


def test_fresh_attention_head_has_a_zero_cls_token_and_the_official_defaults():
    spec = HeadSpec(kind="diffssl-attention", inputs={KEY: (8, 4, 4)}, num_classes=K)
    assert (spec.pre_pool_size, spec.norm_type, spec.width, spec.num_heads, spec.depth, spec.mlp_ratio) == \
        (16, "layer", 1024, 8, 2, 4.0)
    head = build_head(spec)
    assert torch.equal(head.cls, torch.zeros(1, 1, 1024))
    assert not any(n.endswith("pos") for n, _ in head.named_parameters())
    linear = HeadSpec(kind="diffssl-linear", inputs={KEY: (8, 4, 4)}, num_classes=K)
    assert linear.pre_pool_size == 2 and build_head(linear).classifier.in_features == 8 * 2 * 2


def test_adm_attention_head_and_difformer_parameter_counts():
    """ADM-256, 1000 classes, scripts/attention.sh on block 24 (1024 x 16 x 16): counted by hand."""
    c, s, d, r, depth, k = 1024, 16, 1024, 4, 2, 1000
    block = 2 * 2 * d + 3 * d * d + (d * d + d) + (d * r * d + r * d) + (r * d * d + d)
    expected = 2 * c * s * s + (c * d + d) + d + depth * block + (d * k + k)
    with torch.device("meta"):
        head = build_head(HeadSpec(kind="diffssl-attention", inputs={KEY: (c, s, s)}, num_classes=k))
    assert n_params(head) == expected == 27_786_216

    # scripts/fusion.sh: t 90, 150, 300 x b19 (1024x8x8), b24, b30 (512x64x64, pooled to 16x16)
    maps = {"b19": (1024, 8), "b24": (1024, 16), "b30": (512, 16)}
    fusion = sum(2 * c * side * side + (c * d + d) for c, side in maps.values()) + d + depth * block + (3 * d * k + k)
    shapes = {"b19": (1024, 8, 8), "b24": (1024, 16, 16), "b30": (512, 64, 64)}
    with torch.device("meta"):
        head = build_head(HeadSpec(kind="diffssl-difformer", num_classes=k,
                                   inputs={(t, b): shape for t in (90, 150, 300) for b, shape in shapes.items()}))
    assert n_params(head) == fusion == 31_802_344


@pytest.mark.parametrize(("kw", "message"), [
    ({"kind": "diffssl-mlp"}, "needs --head-arc"),
    ({"kind": "diffssl-linear", "head_arc": "64"}, "use --head diffssl-mlp"),
    ({"kind": "diffssl-mlp", "head_arc": "64_x"}, "positive widths joined by '_'"),
    ({"kind": "diffssl-attention", "norm_type": "group"}, "unknown --norm-type 'group'"),
    ({"kind": "diffssl-attention", "width": 30, "num_heads": 8}, "multiple of --attn-heads"),
    ({"kind": "diffssl-linear", "norm_type": "layer"}, "set diffssl-attention"),
    ({"kind": "diffssl-linear", "pre_pool_size": 0}, "--pre-pool-size must be a positive"),
    ({"kind": "attention", "pre_pool_size": 4}, "--pre-pool-size 4: not an option of the attention head"),
    ({"kind": "diffssl-linear", "pool": 2}, "--pool 2: not an option of the diffssl-linear head"),  # once ignored
    ({"kind": "diffssl-linear", "hidden": 64}, "--hidden 64: not an option of the diffssl-linear head"),
])
def test_bad_diffssl_specs_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        HeadSpec(inputs={KEY: (4, 8, 8)}, num_classes=K, **kw)


def test_official_keys_of_no_known_place_are_refused():
    ref = RefLinearHead(4, 2, [], K)
    with pytest.raises(ValueError, match="unexpected key 'pool.weight'"):
        from_official_state_dict("diffssl-linear", {**ref.state_dict(), "pool.weight": torch.zeros(1)})
    two_blocks = RefFusion({"24": (4, 8), "30": (4, 8)}, 1, 16, "layer", 8, 2, 4, 1, K).state_dict()
    with pytest.raises(ValueError, match="reads one block"):
        from_official_state_dict("diffssl-attention", two_blocks)
    with pytest.raises(ValueError, match="not the checkpoint's blocks"):
        from_official_state_dict("diffssl-difformer", two_blocks, block_order=["24", "19"])


# -- through the CLI and the trainer --------------------------------------------------------------
N = 96


@pytest.fixture(scope="module")
def store(tmp_path_factory, build_run, lit_channel, noise) -> str:
    """Block a tells the class, block b is noise."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, N)
    run = build_run(tmp_path_factory.mktemp("diffssl") / "s.zarr", {
        (5, "a"): lit_channel(rng, labels, (4, 8, 8)), (5, "b"): noise(rng, N, (4, 4, 4))}, labels)
    return run.store.url


@pytest.mark.parametrize(("head", "lr", "options"), [
    ("diffssl-linear", "0.05", []),
    ("diffssl-mlp", "0.05", ["--head-arc", "16"]),
    ("diffssl-attention", "0.003", ["--width", "16", "--attn-heads", "2", "--depth", "1", "--pre-pool-size", "4"]),
    ("diffssl-difformer", "0.003", ["--block", "b", "--width", "16", "--attn-heads", "2", "--depth", "1", "--pre-pool-size", "4"]),
])
def test_probe_trains_a_diffssl_head(store, tmp_path, head, lr, options):
    result = CliRunner().invoke(app, [
        "probe", store, "--head", head, "--block", "a", "--timestep", "5", "--lr", lr, "--epochs", "4",
        "--batch-size", "16", *options, "--out", str(tmp_path), "--json",
    ])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    (trained,) = doc["heads"]
    blocks = "a+b" if head == "diffssl-difformer" else "a"
    assert trained["name"] == f"{head}_t5_{blocks}_lr{lr}" and trained["spec"]["kind"] == head
    assert doc["top1"] >= 0.9
    if head in ("diffssl-attention", "diffssl-difformer"):
        assert (trained["spec"]["width"], trained["spec"]["pre_pool_size"], trained["spec"]["norm_type"]) == (16, 4, "layer")


@pytest.mark.parametrize(("args", "message"), [
    (["--head", "diffssl-mlp"], "needs --head-arc"),
    (["--head", "linear", "--pre-pool-size", "2"], "--pre-pool-size 2: not an option of the linear head (it takes --pool)"),
])
def test_probe_refuses_bad_diffssl_options_in_one_line(store, args, message):
    result = CliRunner().invoke(app, ["probe", store, *args, "--block", "a", "--timestep", "5", "--epochs", "1"])
    assert result.exit_code == 1, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("error: ") and message in result.output


def test_a_saved_diffssl_head_is_rebuilt_from_its_file_alone(tmp_path):
    from pipelines.heads.modules import load_head, save_head

    spec = HeadSpec(kind="diffssl-attention", inputs={KEY: (6, 8, 8)}, num_classes=K, norm_type="batch", width=8,
                    num_heads=2, depth=1, pre_pool_size=4)
    head = randomized(build_head(spec))
    save_head(head, tmp_path / "h.safetensors")
    loaded = load_head(tmp_path / "h.safetensors")
    x = {KEY: torch.randn(B, 6, 8, 8)}
    assert loaded.spec == spec
    torch.testing.assert_close(loaded(x), head(x), rtol=0, atol=0)


def test_diffssl_recipe_is_plain_sgd_with_the_lr_divided_by_10_every_7_epochs():
    """Two batches per epoch for 16 epochs against gradient descent written out: w -= lr_e * grad,
    lr_e = 0.05 * 0.1 ** (epoch // 7); no momentum, no weight decay, no warmup."""
    from pipelines.heads.data import Batch
    from pipelines.heads.training import TrainConfig, Trainee

    torch.manual_seed(0)
    spec = HeadSpec(kind="diffssl-mlp", inputs={KEY: (3, 4, 4)}, num_classes=K, head_arc="6")
    head = build_head(spec)
    reference = {k: v.clone() for k, v in head.state_dict().items()}
    batches = [Batch({KEY: torch.randn(8, 3, 4, 4)}, {}, torch.randint(0, K, (8,)), np.arange(8)) for _ in range(2)]
    trainee = Trainee("h", head, 0.05, TrainConfig(epochs=16, recipe="diffssl"), 2, torch.device("cpu"))
    manual = build_head(spec)
    manual.load_state_dict(reference)
    for epoch in range(16):
        for batch in batches:
            trainee.step(batch)
            manual.zero_grad()
            torch.nn.functional.cross_entropy(manual(batch.features), batch.labels).backward()
            with torch.no_grad():
                for p in manual.parameters():
                    p -= 0.05 * 0.1 ** (epoch // 7) * p.grad
        trainee.trained(0.0)
        assert trainee.epoch_log[-1]["lr"] == pytest.approx(0.05 * 0.1 ** (epoch // 7))
    for name, value in manual.state_dict().items():
        torch.testing.assert_close(head.state_dict()[name], value, rtol=0, atol=1e-6)


def test_probe_diffssl_recipe_defaults_and_refusals(store, tmp_path):
    args = ["probe", store, "--head", "diffssl-linear", "--block", "a", "--timestep", "5", "--recipe", "diffssl"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    train = doc["config"]["train"]
    assert (doc["config"]["lrs"], train["batch_size"], train["patience"], train["recipe"]) == ([0.05], 128, 0, "diffssl")
    assert (train["weight_decay"], train["warmup_epochs"], train["epochs"]) == (0.0, 0.0, 28)
    assert doc["epochs_run"] == 28 and doc["heads"][0]["epoch_log"][-1]["lr"] == pytest.approx(0.05 * 0.1 ** 3)
    refused = CliRunner().invoke(app, [*args, "--weight-decay", "0.1"])
    assert refused.exit_code == 1 and "the diffssl recipe has neither" in refused.output
    unknown = CliRunner().invoke(app, [*args, "--recipe", "sgd"])
    assert unknown.exit_code == 1 and "unknown --recipe 'sgd'" in unknown.output
