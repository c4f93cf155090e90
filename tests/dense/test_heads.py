"""Dense heads against computations written out here."""

import numpy as np
import pytest
import torch
from torch import nn

from pipelines.dense.heads import CosineLogits, DenseSpec, build_dense_head, load_dense_head, save_dense_head


def test_linear_head_is_layernorm_then_a_per_pixel_matrix_product():
    torch.manual_seed(0)
    spec = DenseSpec("linear", {(0, "a"): (5, 6, 6)}, 3, 6)
    head = build_dense_head(spec)
    x = torch.randn(2, 5, 6, 6)
    out = head({(0, "a"): x}).detach().numpy()
    v = x.numpy().transpose(0, 2, 3, 1)  # (B, h, w, C)
    norm = (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-5)
    w = head.conv.weight.detach().numpy()[:, :, 0, 0]  # LayerNorm's affine starts at identity
    expected = np.einsum("bhwc,kc->bkhw", norm, w) + head.conv.bias.detach().numpy()[None, :, None, None]
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_linear_head_upsamples_its_logits_bilinearly_to_the_target_size():
    spec = DenseSpec("linear", {(0, "a"): (4, 2, 2)}, 2, 4)
    head = build_dense_head(spec)
    x = torch.randn(1, 4, 2, 2)
    low = head.maps({(0, "a"): x})[0, 0].detach().numpy()
    out = head({(0, "a"): x})[0, 0].detach().numpy()
    # align_corners=False, 2 -> 4: output pixel i samples input coordinate (i + 0.5) / 2 - 0.5, clamped
    coords = np.clip((np.arange(4) + 0.5) / 2 - 0.5, 0, 1)
    lerp = lambda a, b, f: a * (1 - f) + b * f  # noqa: E731
    rows = np.stack([lerp(low[0], low[1], f) for f in coords])
    expected = np.stack([lerp(rows[:, 0], rows[:, 1], f) for f in coords], axis=1)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def official_pixel_classifier(numpy_class: int, dim: int) -> nn.Sequential:
    """ddpm-segmentation's src/pixel_classifier.py layers, rewritten here from its description."""
    h1, h2 = (128, 32) if numpy_class < 30 else (256, 128)
    return nn.Sequential(nn.Linear(dim, h1), nn.ReLU(), nn.BatchNorm1d(h1), nn.Linear(h1, h2), nn.ReLU(),
                         nn.BatchNorm1d(h2), nn.Linear(h2, numpy_class))


@pytest.mark.parametrize("classes", [5, 40])
def test_hypercolumn_is_the_ddpm_segmentation_pixel_classifier_on_upsampled_concatenated_blocks(classes):
    torch.manual_seed(0)
    spec = DenseSpec("hypercolumn", {(0, "a"): (3, 4, 4), (0, "b"): (2, 8, 8)}, classes, 8)
    head = build_dense_head(spec)
    convs = [m for m in head.layers if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == ([128, 32, classes] if classes < 30 else [256, 128, classes])
    for c in convs:  # their init_weights('normal', 0.02)
        assert torch.all(c.bias == 0) and abs(float(c.weight.detach().std()) - 0.02) < 0.004
    official = official_pixel_classifier(classes, 5)
    with torch.no_grad():
        for mine, theirs in zip(head.layers, official):
            if isinstance(mine, nn.Conv2d):
                theirs.weight.copy_(mine.weight[:, :, 0, 0])
                theirs.bias.copy_(mine.bias)
    a, b = torch.randn(3, 3, 4, 4), torch.randn(3, 2, 8, 8)
    for mode in ("train", "eval"):  # batch statistics over every pixel of the batch, then running ones
        getattr(head, mode)()
        getattr(official, mode)()
        out = head({(0, "a"): a, (0, "b"): b})
        up = torch.nn.functional.interpolate(a, size=(8, 8), mode="bilinear")  # their collect_features
        pixels = torch.cat([up, b], 1).permute(0, 2, 3, 1).reshape(-1, 5)
        expected = official(pixels).reshape(3, 8, 8, classes).permute(0, 3, 1, 2)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_uhead_ends_in_per_pixel_outputs_and_needs_two_blocks():
    spec = DenseSpec("uhead", {(0, "a"): (8, 2, 2), (0, "b"): (4, 4, 4)}, 1, 16, width=16)
    out = build_dense_head(spec)({(0, "a"): torch.randn(2, 8, 2, 2), (0, "b"): torch.randn(2, 4, 4, 4)})
    assert out.shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="at least two --block"):
        DenseSpec("uhead", {(0, "a"): (8, 2, 2)}, 3, 4)
    with pytest.raises(ValueError, match="reads one"):
        DenseSpec("linear", {(0, "a"): (8, 2, 2), (0, "b"): (4, 4, 4)}, 3, 4)


def test_cosine_logits_against_text_embeddings():
    spec = DenseSpec("linear", {(0, "a"): (4, 3, 3)}, 6, 3)
    model = CosineLogits(build_dense_head(spec), temperature=0.5)
    x, text = torch.randn(2, 4, 3, 3), torch.randn(5, 6)
    out = model({(0, "a"): x}, text).detach().numpy()
    e = model.head({(0, "a"): x}).detach().numpy()
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    t = text.numpy() / np.linalg.norm(text.numpy(), axis=1, keepdims=True)
    np.testing.assert_allclose(out, np.einsum("bdhw,kd->bkhw", e, t) / 0.5, rtol=1e-4, atol=1e-5)


def test_a_saved_head_is_rebuilt_from_its_file(tmp_path):
    spec = DenseSpec("hypercolumn", {(10, "a"): (3, 4, 4), (None, "b"): (2, 8, 8)}, 4, 8)
    head = build_dense_head(spec).eval()
    save_dense_head(head, tmp_path / "h.safetensors")
    again = load_dense_head(tmp_path / "h.safetensors")
    assert again.spec == spec
    x = {(10, "a"): torch.randn(2, 3, 4, 4), (None, "b"): torch.randn(2, 2, 8, 8)}
    torch.testing.assert_close(again(x), head(x))
