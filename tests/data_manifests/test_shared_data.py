"""The shipped dataset YAMLs on the real data in ../shared/data (skipped when it is absent)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_manifests.manifest import load_dataset
from data_manifests.sources import load_image

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"

pytestmark = pytest.mark.shared


def shared_root(name: str) -> Path:
    root = SHARED / name
    if not root.is_dir():
        pytest.skip(f"../shared/data not found: {root.resolve()} is absent (the real-data tests need it)")
    return root


def test_mnist_test():
    m = load_dataset("mnist-test", data_root=shared_root("mnist-test"))
    assert len(m) == 10_000 and m.classes == tuple("0123456789")
    assert set(m.splits) == {"test"} and m.missing() == []
    assert m.labels[:5] == (7, 2, 1, 0, 4)
    image = load_image(*m.path_of(0))
    assert image.mode == "L" and image.size == (28, 28)


def test_demo_is_the_first_2000_mnist_test_images():
    real = load_dataset("mnist-test", data_root=shared_root("mnist-test"))
    demo = load_dataset("demo")
    with np.load(demo.path_of(0)[0], allow_pickle=False) as npz:
        assert npz["images"].dtype == np.uint8 and npz["images"].shape == (2000, 28, 28)
        assert npz["labels"].dtype == np.int64
    assert demo.labels == real.labels[:2000]
    for i in (0, 999, 1000, 1999):
        assert np.array_equal(np.asarray(load_image(*demo.path_of(i))), np.asarray(load_image(*real.path_of(i))))
    demo_images = np.stack([np.asarray(load_image(*demo.path_of(i))) for i in range(2000)])
    real_images = np.stack([np.asarray(load_image(*real.path_of(i))) for i in range(2000)])
    assert np.array_equal(demo_images, real_images)


def test_cifar10_test():
    m = load_dataset("cifar10-test", data_root=shared_root("cifar10-test"))
    assert len(m) == 10_000 and len(m.classes) == 10
    assert m.classes[:3] == ("airplane", "automobile", "bird")
    assert set(Counter(m.labels).values()) == {1000}
    assert set(m.splits) == {"test"} and set(m.domains) == {"photo"}
    image = load_image(*m.path_of(9999))
    assert image.mode == "RGB" and image.size == (32, 32)


def test_pacs():
    m = load_dataset("pacs", data_root=shared_root("pacs"))
    assert Counter(m.domains) == {"photo": 1670, "sketch": 3929}
    assert m.classes == ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
    sketch_counts = Counter(name for name, domain in zip(m.class_names, m.domains) if domain == "sketch")
    assert sketch_counts["house"] == 80 and sketch_counts["person"] == 160
    assert load_image(*m.path_of(len(m) - 1)).mode == "RGB"


def test_quickdraw():
    m = load_dataset("quickdraw", data_root=shared_root("quickdraw"))
    # 360 drawings: the README's "344" is `wc -l`, which misses the last line of each of the 16
    # files because none ends with a newline.
    assert len(m) == 360 and len(m.classes) == 16
    assert "cruise_ship" in m.classes and set(m.domains) == {"sketch"}
    image = np.asarray(load_image(*m.path_of(0)))
    assert image.shape == (256, 256) and image.min() == 0 and np.median(image) == 255
