"""Head modules: output shapes, token counts, the cosine classifier, bad specs, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.heads.modules import (
    READS,
    CosineClassifier,
    HeadSpec,
    build_head,
    load_head,
    save_head,
)

B, K = 3, 5
TWO_BLOCKS = {(90, "b19"): (16, 8, 8), (90, "b24"): (12, 16, 16), (150, "b19"): (16, 8, 8), (150, "b24"): (12, 16, 16)}
SMALL = {"width": 16, "num_heads": 4, "hidden": 8, "expert_width": 8}


def small(kind: str) -> dict:
    """The SMALL sizes that a head of `kind` takes (any other is refused)."""
    return {name: value for name, value in SMALL.items() if name in READS[kind]}

CASES = {
    "linear": {"inputs": {(10, "up1"): (12, 8, 8)}},
    "mlp": {"inputs": {(None, "layer3"): (12, 6, 6)}},
    "attention": {"inputs": {(10, "up1"): (12, 32, 32)}},
    "difformer": {"inputs": TWO_BLOCKS},
    "uhead": {"inputs": {(90, "b24"): (12, 16, 16), (90, "b19"): (16, 8, 8), (90, "b30"): (8, 32, 32)}},
    "uhead+expert": {"inputs": {(90, "b24"): (12, 16, 16), (90, "b19"): (16, 8, 8)},
                     "expert_inputs": {(None, "layer2"): (6, 4, 4), (None, "layer4"): (10, 2, 2)}},
    "uhead+conv": {"inputs": {(90, "b24"): (12, 16, 16), (90, "b19"): (16, 8, 8)}, "pooling": "conv"},
}


def random_inputs(shapes: dict) -> dict:
    return {key: torch.randn(B, *shape) for key, shape in shapes.items()}


def spec_of(case: str, **kw) -> HeadSpec:
    kind = case.split("+")[0]
    return HeadSpec(kind=kind, num_classes=K, **small(kind), **{**CASES[case], **kw})


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("classifier", ["linear", "cosine"])
def test_every_head_gives_one_row_of_logits_per_image(case, classifier):
    torch.manual_seed(0)
    text = torch.randn(K, 7) if classifier == "cosine" else None
    spec = spec_of(case, classifier=classifier, text_dim=None if text is None else 7)
    head = build_head(spec, text)
    logits = head(random_inputs(spec.inputs), random_inputs(spec.expert_inputs))
    assert logits.shape == (B, K) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None for p in head.parameters())  # every part is in the graph


def encoder_input_shape(head, inputs) -> tuple:
    seen = []
    hook = head.encoder.layers.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    head(inputs)
    hook.remove()
    return seen[0]


@pytest.mark.parametrize(("side", "tokens"), [(32, 256), (16, 256), (8, 64)])
def test_attention_head_pools_only_maps_larger_than_16(side, tokens):
    spec = HeadSpec(kind="attention", inputs={(5, "b"): (12, side, side)}, num_classes=K, **small("attention"))
    head = build_head(spec)
    assert encoder_input_shape(head, random_inputs(spec.inputs)) == (B, tokens + 1, 16)  # + CLS
    assert head.encoder.pos.shape == (1, tokens + 1, 16)


def test_difformer_concatenates_block_tokens_per_timestep_and_cls_over_timesteps():
    spec = spec_of("difformer")
    head = build_head(spec)
    # 8x8 -> 64 tokens, 16x16 -> 256 tokens; both timesteps go through the shared encoder in one batch
    assert encoder_input_shape(head, random_inputs(spec.inputs)) == (2 * B, 64 + 256 + 1, 16)
    assert head.classifier.in_features == 2 * 16
    with pytest.raises(ValueError, match=r"missing \[\(150, 'b24'\)\]"):
        build_head(HeadSpec(kind="difformer", inputs={k: s for k, s in TWO_BLOCKS.items() if k != (150, "b24")},
                            num_classes=K, **small("difformer")))


def test_uhead_goes_from_coarse_to_fine_and_reads_the_expert():
    spec = spec_of("uhead")
    head = build_head(spec)
    assert head.levels == [(90, "b19"), (90, "b24"), (90, "b30")]  # 8x8, 16x16, 32x32
    torch.manual_seed(1)
    expert_spec = spec_of("uhead+expert")
    with_expert = build_head(expert_spec).eval()
    inputs, expert = random_inputs(expert_spec.inputs), random_inputs(expert_spec.expert_inputs)
    changed = random_inputs(expert_spec.expert_inputs)
    assert not torch.allclose(with_expert(inputs, expert), with_expert(inputs, changed))
    with pytest.raises(ValueError, match="pass the expert"):
        with_expert(inputs)


@pytest.mark.parametrize("kind", ["difformer", "uhead"])
def test_fusion_heads_refuse_a_single_block(kind):
    with pytest.raises(ValueError, match="at least two --block"):
        HeadSpec(kind=kind, inputs={(90, "b19"): (4, 8, 8), (150, "b19"): (4, 8, 8)}, num_classes=K)


@pytest.mark.parametrize(("kw", "message"), [
    ({"kind": "attention", "inputs": {(1, "a"): (4, 2, 2), (1, "b"): (4, 2, 2)}}, "reads one"),
    ({"kind": "linear", "inputs": {(1, "a"): (4, 2, 2)}, "expert_inputs": {(None, "e"): (4, 2, 2)}}, "only the uhead"),
    ({"kind": "linear", "inputs": {(1, "a"): (4, 2, 2)}, "classifier": "cosine"}, "needs text embeddings"),
    ({"kind": "transformer", "inputs": {(1, "a"): (4, 2, 2)}}, "unknown head"),
])
def test_bad_specs_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        HeadSpec(num_classes=K, **kw)


def test_cosine_classifier_is_the_scaled_cosine_to_the_fixed_text_embeddings():
    rng = np.random.default_rng(0)
    f, w, text = rng.normal(size=(4, 6)), rng.normal(size=(3, 6)), rng.normal(size=(K, 3))
    projected = f @ w.T
    expected = (projected / np.linalg.norm(projected, axis=1, keepdims=True)) @ (text / np.linalg.norm(text, axis=1, keepdims=True)).T

    cosine = CosineClassifier(6, torch.tensor(text), temperature=0.5)
    with torch.no_grad():
        cosine.proj.weight.copy_(torch.tensor(w))
    logits = cosine(torch.tensor(f, dtype=torch.float32)).detach().numpy()
    np.testing.assert_allclose(logits, expected / 0.5, rtol=1e-5, atol=1e-6)
    cosine.temperature = 0.05
    np.testing.assert_allclose(cosine(torch.tensor(f, dtype=torch.float32)).detach().numpy(), expected / 0.05, rtol=1e-5, atol=1e-5)
    assert [p for p in cosine.parameters()] == [cosine.proj.weight]  # the text embeddings stay fixed


@pytest.mark.parametrize("case", ["attention", "uhead+expert"])
def test_a_saved_head_is_rebuilt_from_its_file_alone(tmp_path, case):
    text = torch.randn(K, 7)
    spec = spec_of(case, classifier="cosine", text_dim=7, temperature=0.2)
    head = build_head(spec, text).eval()
    save_head(head, tmp_path / "h.safetensors")
    loaded = load_head(tmp_path / "h.safetensors")
    assert loaded.spec == spec
    inputs, expert = random_inputs(spec.inputs), random_inputs(spec.expert_inputs)
    torch.testing.assert_close(loaded(inputs, expert), head(inputs, expert), rtol=0, atol=0)
