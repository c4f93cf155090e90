"""The vermouth-uhead against a reference model written here from the official Vermouth code's
description (github.com/develop-productivity/Vermouth: FuseClassifier/SimpleFuse/FuseBlock,
AttentionPool2d, the ResNet expert's Adapter, DiffusionClassifier's cosine classifier), in the
official state-dict layout: loaded through `from_official_state_dict`, our head gives the same
logits and has the same number of parameters."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from cli.main import app
from pipelines.heads.modules import HeadSpec, build_head, load_head, save_head
from pipelines.heads.vermouth import from_official_state_dict, head_from_official

B, K, T = 3, 5, 7
WIDTHS = {"tiny": [1024, 768, 512, 256], "pico": [256, 256, 256, 256], "small": [1024, 768, 512, 256]}


# -- reference model, official key layout ---------------------------------------------------------
class RefFuseBlock(nn.Module):
    def __init__(self, c_in, c_out, kernel, stage2):
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.GroupNorm(32, c_out), nn.SiLU())
        self.stage2 = None
        if stage2:
            self.stage2 = nn.Sequential(nn.Conv2d(c_out, c_out, kernel, padding=1 if kernel == 3 else 0, bias=False),
                                        nn.GroupNorm(32, c_out), nn.SiLU())

    def forward(self, x):
        out = self.stage1(x)
        if self.stage2 is not None:
            out = F.silu(out + self.stage2(out))
        return out


class RefFuseClassifier(nn.Module):
    """in_dims coarse to fine; high2low: level i also takes the width of level i+1."""

    def __init__(self, in_dims, arch):
        super().__init__()
        w = WIDTHS[arch]
        dims = [d + (w[i + 1] if i < 3 else 0) for i, d in enumerate(in_dims)]
        small = arch == "small"
        self.low_res_conv = RefFuseBlock(dims[0], w[0], 1, small)
        self.mid_res_conv = RefFuseBlock(dims[1], w[1], 1, small)
        self.high_res_conv = RefFuseBlock(dims[2], w[2], 3, small)
        self.highest_res_conv = RefFuseBlock(dims[3], w[3], 3, small)

    def forward(self, maps):
        low, mid, high, highest = maps
        highest = F.avg_pool2d(self.highest_res_conv(highest), 2, 2)
        high = F.avg_pool2d(self.high_res_conv(torch.cat([high, highest], 1)), 2, 2)
        mid = F.avg_pool2d(self.mid_res_conv(torch.cat([mid, high], 1)), 2, 2)
        low = self.low_res_conv(torch.cat([low, mid], 1))
        if low.shape[-1] != 4:
            low = nn.AdaptiveAvgPool2d((4, 4))(low)
        return low


class RefAttentionPool2d(nn.Module):
    def __init__(self, embed_dim, num_heads, output_dim):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(17, embed_dim) / embed_dim ** 0.5)
        self.k_proj, self.q_proj, self.v_proj = (nn.Linear(embed_dim, embed_dim) for _ in range(3))
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def forward(self, x):
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(2, 0, 1)  # (HW, N, C)
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0) + self.positional_embedding[:, None, :]
        x, _ = F.multi_head_attention_forward(
            query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=self.num_heads,
            q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight, v_proj_weight=self.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=self.c_proj.weight,
            out_proj_bias=self.c_proj.bias, use_separate_proj_weight=True, training=False, need_weights=False)
        return x[0]


class RefAdapter(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.adapter = nn.Sequential(nn.Conv2d(c, c // 4, 1, bias=False), nn.ReLU(), nn.Conv2d(c // 4, c, 1, bias=False))

    def forward(self, x):
        return self.adapter(x)


class RefExpert(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.mappers = nn.ModuleList(RefAdapter(c) for c in dims)


class RefDiffusionClassifier(nn.Module):
    """The trained parts of DiffusionClassifier over cached maps (coarse to fine) and expert maps."""

    def __init__(self, in_dims, arch, expert_dims, text, temperature):
        super().__init__()
        self.expert = RefExpert(expert_dims) if expert_dims else None
        dims = list(in_dims)
        if expert_dims:
            dims[1:] = [d + e for d, e in zip(dims[1:], expert_dims)]
        self.classifier = RefFuseClassifier(dims, arch)
        self.attn_pool = RefAttentionPool2d(WIDTHS[arch][0], 8, 768)
        self.register_buffer("text_features", F.normalize(text, dim=-1))
        self.temperature = temperature

    def forward(self, maps, expert_maps=None):
        maps = list(maps)
        if self.expert is not None:
            adapted = [m(x) for m, x in zip(self.expert.mappers, expert_maps)]
            maps[1:] = [torch.cat([F.normalize(d, dim=1), F.normalize(e, dim=1)], dim=1) for d, e in zip(maps[1:], adapted)]
        f = F.normalize(self.attn_pool(self.classifier(maps)), dim=-1)
        return f @ self.text_features.T / self.temperature


def randomized(model: nn.Module) -> nn.Module:
    """Every parameter redrawn, GroupNorm affine included (ones/zeros would hide a swapped weight/bias)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 1 / math.sqrt(max(1, p[0].numel())) if p.ndim > 1 else 0.5)
    return model


def make_case(arch: str, sides: list[int], chans: list[int], expert_chans: list[int] | None):
    """(reference, our spec, maps by key, expert maps by key); `sides` coarse to fine, keys given fine to coarse."""
    torch.manual_seed(0)
    text = torch.randn(K, 768)
    keys = [(T, f"b{i}") for i in range(4)]
    inputs = {keys[i]: (chans[i], sides[i], sides[i]) for i in reversed(range(4))}  # given fine to coarse
    expert_inputs = {}
    if expert_chans:
        expert_inputs = {(None, f"layer{4 - j}"): (expert_chans[j], sides[j + 1], sides[j + 1]) for j in range(3)}
    spec = HeadSpec(kind="vermouth-uhead", inputs=inputs, num_classes=K, expert_inputs=expert_inputs,
                    classifier="cosine", text_dim=768, fuse_arch=arch)
    ref = randomized(RefDiffusionClassifier(chans, arch, expert_chans, text, 0.2)).eval()
    maps = {k: torch.randn(B, *s) for k, s in inputs.items()}
    expert = {k: torch.randn(B, *s) for k, s in expert_inputs.items()}
    return ref, spec, maps, expert


@pytest.mark.parametrize(("arch", "sides", "expert_chans"), [
    ("tiny", [2, 4, 8, 16], None),
    ("tiny", [4, 8, 16, 32], [16, 12, 8]),
    ("pico", [3, 6, 12, 25], [8, 8, 8]),  # odd finest side: the 2x2 pool floors
    ("small", [2, 4, 8, 16], [8, 4, 4]),
])
def test_vermouth_uhead_equals_the_official_model(arch, sides, expert_chans):
    chans = [10, 9, 7, 5]
    ref, spec, maps, expert = make_case(arch, sides, chans, expert_chans)
    ours = head_from_official(spec, ref.state_dict())
    levels = [maps[(T, f"b{i}")] for i in range(4)]
    expert_levels = [expert[(None, f"layer{4 - j}")] for j in range(3)] if expert_chans else None
    with torch.no_grad():
        want = ref(levels, expert_levels)
        got = ours(maps, expert or None)
    assert got.shape == (B, K)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


def test_fresh_head_has_the_official_defaults_and_initialisation():
    torch.manual_seed(0)
    spec = HeadSpec(kind="vermouth-uhead", inputs={(T, f"b{i}"): (64, 2 ** i, 2 ** i) for i in range(1, 5)},
                    num_classes=K, classifier="cosine", text_dim=768)
    head = build_head(spec, torch.randn(K, 768))
    assert (spec.fuse_arch, spec.num_heads, spec.temperature) == ("tiny", 8, 0.2)
    conv = head.fuse[0].conv.weight  # 1024 x (64 + 768): Kaiming normal, std sqrt(2 / fan_in)
    assert abs(conv.std().item() / math.sqrt(2 / conv.shape[1]) - 1) < 0.02
    assert torch.equal(head.fuse[0].norm.weight, torch.ones(1024)) and torch.equal(head.fuse[0].norm.bias, torch.zeros(1024))
    pos = head.pool.pos  # N(0, 1) / sqrt(C)
    assert pos.shape == (17, 1024) and abs(pos.std().item() * 32 - 1) < 0.05
    bound = 1 / math.sqrt(1024)  # the pool's linears keep PyTorch's default uniform(-1/sqrt(fan_in), ...)
    assert head.pool.q.weight.abs().max().item() <= bound and head.pool.q.weight.std().item() > 0.9 * bound / math.sqrt(3)


@pytest.mark.parametrize(("kw", "message"), [
    ({"classifier": "linear", "text_dim": None}, "cosine against 768-wide"),
    ({"text_dim": 512}, "cosine against 768-wide"),
    ({"fuse_arch": "huge"}, "unknown --fuse-arch"),
    ({"inputs": {(T, "a"): (4, 2, 2), (T, "b"): (4, 4, 4), (T, "c"): (4, 8, 8)}}, "four blocks of one timestep"),
    ({"inputs": {(T, "a"): (4, 2, 2), (T, "b"): (4, 4, 4), (T, "c"): (4, 8, 8), (T, "d"): (4, 12, 12)}}, "halve"),
    ({"expert_inputs": {(None, "x"): (8, 4, 4)}}, "three maps"),
    ({"expert_inputs": {(None, "x"): (8, 4, 4), (None, "y"): (8, 8, 8), (None, "z"): (8, 8, 8)}}, "without resampling"),
    # options of other heads: once accepted, ignored, and recorded in the saved spec as if used
    ({"pooling": "conv"}, "--pooling conv: not an option of the vermouth-uhead head"),
    ({"width": 64}, "--width 64: not an option of the vermouth-uhead head"),
])
def test_bad_vermouth_specs_are_refused(kw, message):
    base = {"kind": "vermouth-uhead", "inputs": {(T, f"b{i}"): (4, 2 ** i, 2 ** i) for i in range(1, 5)},
            "num_classes": K, "classifier": "cosine", "text_dim": 768}
    with pytest.raises(ValueError, match=message):
        HeadSpec(**{**base, **kw})


def test_fuse_arch_is_refused_for_other_heads():
    with pytest.raises(ValueError, match="--fuse-arch tiny: not an option of the uhead head"):
        HeadSpec(kind="uhead", inputs={(T, "a"): (4, 2, 2), (T, "b"): (4, 4, 4)}, num_classes=K, fuse_arch="tiny")


def test_official_keys_of_no_known_place_are_refused_and_frozen_parts_skipped():
    ref, spec, _, _ = make_case("pico", [2, 4, 8, 16], [10, 9, 7, 5], None)
    state = {**ref.state_dict(), "feature_extractor.unet.norm.weight": torch.ones(3),
             "expert.extracter.conv1.weight": torch.ones(3)}
    assert set(from_official_state_dict(state)) == set(build_head(spec).state_dict())
    with pytest.raises(ValueError, match="unexpected key 'classifier.low_res_conv.stage3.0.weight'"):
        from_official_state_dict({**state, "classifier.low_res_conv.stage3.0.weight": torch.ones(1)})
    with pytest.raises(ValueError, match="this vermouth-uhead lacks"):
        head_from_official(spec, {**state, "expert.mappers.0.adapter.0.weight": torch.ones(2, 8, 1, 1)})


def test_a_saved_vermouth_head_is_rebuilt_from_its_file_alone(tmp_path):
    ref, spec, maps, _ = make_case("pico", [2, 4, 8, 16], [10, 9, 7, 5], None)
    head = head_from_official(spec, ref.state_dict())
    save_head(head, tmp_path / "h.safetensors")
    loaded = load_head(tmp_path / "h.safetensors")
    assert loaded.spec == spec
    torch.testing.assert_close(loaded(maps), head(maps), rtol=0, atol=0)


# -- through the CLI and the trainer --------------------------------------------------------------
N = 96


@pytest.fixture(scope="module")
def store(tmp_path_factory, build_run, lit_channel, noise) -> tuple[str, str, str, str]:
    """(store, diffusion run id, expert run id, text embeddings file): the diffusion levels are noise except the
    coarsest, which tells the class; the expert's finest map tells it too."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, N)
    folder = tmp_path_factory.mktemp("vermouth")
    run = build_run(folder / "s.zarr", {
        (5, "a"): lit_channel(rng, labels, (4, 2, 2)), (5, "b"): noise(rng, N, (4, 4, 4)),
        (5, "c"): noise(rng, N, (4, 8, 8)), (5, "d"): noise(rng, N, (4, 16, 16))}, labels)
    expert = build_run(folder / "s.zarr", {
        (None, "layer4"): noise(rng, N, (8, 4, 4)), (None, "layer3"): noise(rng, N, (8, 8, 8)),
        (None, "layer2"): lit_channel(rng, labels, (8, 16, 16))}, labels, name="resnet")
    text = folder / "text.safetensors"
    save_file({"embeddings": torch.randn(3, 768, generator=torch.Generator().manual_seed(0))}, str(text),
              metadata={"classes": json.dumps(["c0", "c1", "c2"])})
    return run.store.url, run.run_id, expert.run_id, str(text)


@pytest.mark.parametrize("with_expert", [False, True])
def test_probe_trains_the_vermouth_uhead(store, tmp_path, with_expert):
    url, run, expert_run, text = store
    expert = ["--expert-run", expert_run] if with_expert else []
    result = CliRunner().invoke(app, [
        "probe", url, "--run", run, "--head", "vermouth-uhead", "--fuse-arch", "pico", "--block", "a,b,c,d",
        "--timestep", "5", "--classifier", "cosine", "--text-embeddings", text, *expert, "--lr", "1e-3",
        "--epochs", "4", "--batch-size", "16", "--out", str(tmp_path), "--json",
    ])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    (trained,) = doc["heads"]
    assert trained["spec"]["kind"] == "vermouth-uhead" and trained["spec"]["temperature"] == 0.2
    assert trained["expert_keys"] == ([[None, "layer4"], [None, "layer3"], [None, "layer2"]] if with_expert else [])
    assert doc["top1"] >= 0.9


@pytest.mark.parametrize(("args", "message"), [
    ([], "cosine against 768-wide"),
    (["--classifier", "cosine", "--text-embeddings", "TEXT", "--fuse-arch", "big"], "unknown --fuse-arch"),
    (["--head", "uhead", "--fuse-arch", "tiny"], "--fuse-arch tiny: not an option of the uhead head"),
])
def test_probe_refuses_bad_vermouth_options_in_one_line(store, args, message):
    url, run, _, text = store
    args = [text if a == "TEXT" else a for a in args]
    head = [] if "--head" in args else ["--head", "vermouth-uhead"]
    result = CliRunner().invoke(app, ["probe", url, "--run", run, *head, *args, "--block", "a,b,c,d",
                                      "--timestep", "5", "--epochs", "1"])
    assert result.exit_code == 1, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("error: ") and message in result.output


def test_vermouth_recipe_is_adamw_at_a_constant_lr_with_the_fuse_gradients_clipped():
    """Six steps against AdamW(lr 1e-3, weight decay 5e-4) with clip_grad_norm_(fuse, 1) written
    out; the fuse gradients' norm exceeds 1 and changes from step to step, so the clipping matters
    (Adam is invariant to a constant gradient scale only)."""
    from pipelines.heads.data import Batch
    from pipelines.heads.training import TrainConfig, Trainee

    ref, spec, _, _ = make_case("pico", [2, 4, 8, 16], [10, 9, 7, 5], None)
    spec = replace(spec, temperature=1e-3)  # sharp logits: gradients well above norm 1
    head = head_from_official(spec, ref.state_dict()).train()
    manual = head_from_official(spec, ref.state_dict()).train()
    batches = [Batch({k: torch.randn(8, *s) for k, s in spec.inputs.items()}, {}, torch.randint(0, K, (8,)),
                     np.arange(8)) for _ in range(2)]
    trainee = Trainee("h", head, 1e-3, TrainConfig(epochs=3, weight_decay=5e-4, warmup_epochs=0, recipe="vermouth"),
                      2, torch.device("cpu"))
    optimizer = torch.optim.AdamW(manual.parameters(), lr=1e-3, weight_decay=5e-4)
    norms = []
    for _ in range(3):
        for batch in batches:
            trainee.step(batch)
            optimizer.zero_grad()
            F.cross_entropy(manual(batch.features), batch.labels).backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(list(manual.fuse.parameters()), 1.0)))
            optimizer.step()
        trainee.trained(0.0)
        assert trainee.epoch_log[-1]["lr"] == 1e-3
    assert max(norms) > 1
    for name, value in manual.state_dict().items():
        torch.testing.assert_close(head.state_dict()[name], value, rtol=0, atol=1e-6)
    for kind, inputs in (("uhead", {(T, "a"): (4, 2, 2), (T, "b"): (4, 4, 4)}), ("linear", {(T, "a"): (4, 2, 2)})):
        with pytest.raises(ValueError, match=f"the vermouth recipe trains the vermouth-uhead, not {kind}"):
            Trainee("u", build_head(HeadSpec(kind=kind, inputs=inputs, num_classes=K)), 1e-3, TrainConfig(recipe="vermouth"),
                    2, torch.device("cpu"))


def test_probe_vermouth_recipe_defaults_and_refusals(store, tmp_path):
    url, run, _, text = store
    args = ["probe", url, "--run", run, "--head", "vermouth-uhead", "--fuse-arch", "pico", "--block", "a,b,c,d",
            "--timestep", "5", "--classifier", "cosine", "--text-embeddings", text, "--recipe", "vermouth"]
    result = CliRunner().invoke(app, [*args, "--epochs", "2", "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    train = json.loads(result.stdout)["config"]["train"]
    assert json.loads(result.stdout)["config"]["lrs"] == [1e-4]
    assert (train["batch_size"], train["patience"], train["weight_decay"], train["warmup_epochs"]) == (64, 0, 5e-4, 0.0)
    refused = CliRunner().invoke(app, [*args, "--warmup-epochs", "1"])
    assert refused.exit_code == 1 and "the vermouth recipe keeps the lr constant" in refused.output


# -- heads import vermouth -------------------------------------------------------------------------
def import_vermouth(ckpt, out, *extra: str):
    shapes = [f"{c},{s},{s}" for c, s in zip([10, 9, 7, 5], [2, 4, 8, 16])]
    return CliRunner().invoke(app, [
        "heads", "import", "vermouth", str(ckpt), "--t-list", "5", "--block", "a,b,c,d",
        *[a for s in shapes for a in ("--input-shape", s)], "--num-classes", "3", "--fuse-arch", "pico", *extra,
        "--out", str(out)])


def official_model(num_classes: int) -> RefDiffusionClassifier:
    torch.manual_seed(1)
    return randomized(RefDiffusionClassifier([10, 9, 7, 5], "pico", None, torch.randn(num_classes, 768), 0.2)).eval()


def test_imported_vermouth_head_is_tested_by_head_file_as_the_official_model(tmp_path, build_run, noise, rng):
    ref = official_model(3)
    state = {**ref.state_dict(), "feature_extractor.unet.conv_in.weight": torch.ones(2)}  # the frozen UNet: skipped
    torch.save(state, tmp_path / "vermouth.pth")
    result = import_vermouth(tmp_path / "vermouth.pth", tmp_path / "head.safetensors")
    assert result.exit_code == 0, result.output
    head = load_head(tmp_path / "head.safetensors")
    labels = rng.integers(0, 3, 48)
    maps = {(5, b): noise(rng, 48, (c, s, s)) for b, c, s in zip("abcd", [10, 9, 7, 5], [2, 4, 8, 16])}
    with torch.no_grad():
        want = ref([torch.from_numpy(maps[(5, b)]) for b in "abcd"])
        torch.testing.assert_close(head({k: torch.from_numpy(v) for k, v in maps.items()}), want, rtol=0, atol=1e-5)
    build_run(tmp_path / "s.zarr", maps, labels)
    tested = CliRunner().invoke(app, ["probe", str(tmp_path / "s.zarr"), "--head-file", str(tmp_path / "head.safetensors"),
                                      "--out", str(tmp_path / "results"), "--json"])
    assert tested.exit_code == 0, tested.output
    test_rows = np.arange(0, 48, 2)  # the store's splits alternate test/train
    assert json.loads(tested.stdout)["top1"] == pytest.approx(float((want.argmax(1).numpy()[test_rows] == labels[test_rows]).mean()))


def test_vermouth_import_errors_are_one_line_and_write_nothing(tmp_path):
    ref = official_model(3)
    with_expert = {**ref.state_dict(), "expert.mappers.0.adapter.0.weight": torch.ones(2, 8, 1, 1)}
    no_text = {k: v for k, v in ref.state_dict().items() if k != "text_features"}
    cases = [({"model_head": ref.state_dict()}, [], "not a Vermouth DiffusionClassifier state dict"),
             (with_expert, [], "has a ResNet expert"),
             (no_text, [], "has no text_features"),
             (ref.state_dict(), ["--fuse-arch", "tiny"], "this vermouth-uhead has (1024, 778, 1, 1)"),  # the last --fuse-arch counts
             (ref.state_dict(), ["--head-arc", "16"], "--head-arc set diffssl imports, not vermouth")]
    for i, (state, extra, message) in enumerate(cases):
        torch.save(state, tmp_path / f"{i}.pth")
        result = import_vermouth(tmp_path / f"{i}.pth", tmp_path / f"{i}.safetensors", *extra)
        assert result.exit_code == 1, result.output
        assert result.output.count("\n") == 1 and message in result.output, result.output
        assert not (tmp_path / f"{i}.safetensors").exists()
