"""Builders on tiny trees the tests write, and load_image on every source kind."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_manifests.builders import BUILDERS, demo, image_folder, imagenet, mnist_idx, pacs, quickdraw
from data_manifests.manifest import ManifestError, load_dataset
from data_manifests.sources import load_image, rasterise_strokes


def write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    """An IDX file (gzip when the name ends in .gz): magic, one big-endian uint32 per dimension, bytes."""
    data = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def write_mnist(root: Path, prefix: str = "t10k", n: int = 5, gz: bool = True) -> tuple[np.ndarray, np.ndarray]:
    root.mkdir(parents=True, exist_ok=True)
    images = np.arange(n * 28 * 28, dtype=np.uint32).reshape(n, 28, 28).astype(np.uint8)
    labels = (np.arange(n) * 3 % 10).astype(np.uint8)
    suffix = ".gz" if gz else ""
    write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", 2051, images)
    write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", 2049, labels)
    return images, labels


def write_png(path: Path, colour=(10, 20, 30), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (4, 3), colour).save(path)


def test_registry_names():
    assert set(BUILDERS) == {"mnist_idx", "image_folder", "pacs", "quickdraw", "imagenet", "demo", "sketch_photo",
                             "quickdraw_photos", "coop_split", "coop_fgvc_aircraft", "coop_imagenet",
                             "voc2012", "ade20k", "cityscapes", "coco_stuff", "nyu_depth_v2", "mnist_seg", "mnist_seg_demo",
                             "quickdraw_seg", "spair", "pf_pascal", "pf_willow", "cub_parts", "warps"}


def test_mnist_idx_and_load_image(tmp_path):
    images, labels = write_mnist(tmp_path)
    m = mnist_idx(tmp_path, "mnist", split="test")
    assert m.ids == tuple(f"t10k-images-idx3-ubyte.gz#{i}" for i in range(5))
    assert m.sources == m.ids
    assert m.labels == (0, 3, 6, 9, 2)
    assert m.classes == tuple("0123456789")
    assert m.class_names == ("0", "3", "6", "9", "2")
    assert set(m.splits) == {"test"} and set(m.domains) == {"digit"}
    for i in (0, 4):
        image = load_image(*m.path_of(i))
        assert image.mode == "L" and image.size == (28, 28)
        assert np.array_equal(np.asarray(image), images[i])


def test_mnist_idx_train_prefix_uncompressed(tmp_path):
    write_mnist(tmp_path, prefix="train", n=3, gz=False)
    m = mnist_idx(tmp_path, "mnist-train", prefix="train")
    assert m.sources[2] == "train-images-idx3-ubyte#2" and set(m.splits) == {"train"}


def test_mnist_idx_bad_files(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2051, np.zeros((5, 1, 1), np.uint8))
    with pytest.raises(ManifestError, match="magic number is 2051, expected 2049"):
        mnist_idx(tmp_path, "mnist")
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2049, np.zeros(4, np.uint8))
    with pytest.raises(ManifestError, match="5 images but 4 labels"):
        mnist_idx(tmp_path, "mnist")
    data = gzip.decompress((tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(data[:-10]))
    with pytest.raises(ManifestError, match=r"shape \(5, 28, 28\)"):
        mnist_idx(tmp_path, "mnist")
    with pytest.raises(ManifestError, match="neither t10k-images-idx3-ubyte nor"):
        mnist_idx(tmp_path / "..", "mnist")


def test_image_folder(tmp_path):
    for cls, names in {"dog": ["b.PNG", "a.jpg"], "cat": ["z.png"], ".hidden": ["x.png"]}.items():
        for name in names:
            write_png(tmp_path / cls / name)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    m = image_folder(tmp_path, "pets", split="test")
    assert m.classes == ("cat", "dog")
    assert m.ids == ("cat/z.png", "dog/a.jpg", "dog/b.PNG")
    assert m.labels == (0, 1, 1)
    assert set(m.splits) == {"test"} and set(m.domains) == {"photo"}
    image = load_image(*m.path_of(2))
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (10, 20, 30)


def test_image_folder_errors(tmp_path):
    with pytest.raises(ManifestError, match="no class subfolders"):
        image_folder(tmp_path, "x")
    (tmp_path / "cat").mkdir()
    with pytest.raises(ManifestError, match="no images found"):
        image_folder(tmp_path, "x")
    write_png(tmp_path / "cat" / "a#1.png")
    with pytest.raises(ManifestError, match="'#' in file names"):
        image_folder(tmp_path, "x")


def test_pacs(tmp_path):
    write_png(tmp_path / "photo" / "dog" / "p1.jpg")
    write_png(tmp_path / "photo" / "guitar" / "p2.jpg")
    write_png(tmp_path / "sketch" / "dog" / "s1.png")
    write_png(tmp_path / "sketch" / "horse" / "s2.png")
    write_png(tmp_path / "art_painting" / "dog" / "a1.jpg")
    m = pacs(tmp_path, "pacs", domains=["photo", "sketch"])
    assert m.classes == ("dog", "guitar", "horse")
    assert m.ids == ("photo/dog/p1.jpg", "photo/guitar/p2.jpg", "sketch/dog/s1.png", "sketch/horse/s2.png")
    assert m.labels == (0, 1, 0, 2)
    assert m.domains == ("photo", "photo", "sketch", "sketch")
    assert set(m.splits) == {"all"}
    with pytest.raises(ManifestError, match="cartoon does not exist"):
        pacs(tmp_path, "pacs", domains=["cartoon"])


def drawing(word: str, strokes: list, recognized: bool = True) -> str:
    return json.dumps({"word": word, "key_id": "1", "recognized": recognized, "drawing": strokes})


HORIZONTAL = [[[0, 100], [50, 50], [0, 10]]]  # one line across the middle
VERTICAL = [[[30, 30], [0, 200], [0, 10]], [[60], [100], [20]]]  # a line and a single-point tap


def test_quickdraw(tmp_path):
    (tmp_path / "cat.ndjson").write_text(drawing("cat", HORIZONTAL) + "\n\n" + drawing("cat", VERTICAL, False))
    (tmp_path / "bus.ndjson").write_text(drawing("bus", VERTICAL) + "\n")
    m = quickdraw(tmp_path, "qd")
    assert m.classes == ("bus", "cat")
    assert m.ids == ("bus.ndjson#0", "cat.ndjson#0", "cat.ndjson#1")  # blank lines do not count
    assert m.labels == (0, 1, 1)
    assert set(m.domains) == {"sketch"} and set(m.splits) == {"all"}
    assert quickdraw(tmp_path, "qd", recognized_only=True).ids == ("bus.ndjson#0", "cat.ndjson#0")

    horizontal = np.asarray(load_image(*m.path_of(1)))
    assert horizontal.shape == (256, 256) and horizontal.dtype == np.uint8
    assert horizontal[128, 20:236].max() < 128  # dark along the stroke (a flat box is centred vertically)
    assert horizontal[:100].min() == 255 and horizontal[160:].min() == 255  # white elsewhere
    # VERTICAL is 30 wide and 200 high: scale 223/200 fills the height inside the 16 px margin, and
    # the box (33.5 px wide) is centred, so the line is near x=111 and the tap near (144, 128).
    rows, cols = np.nonzero(np.asarray(load_image(*m.path_of(2))) < 128)
    assert rows.min() <= 17 and rows.max() >= 238
    assert set(cols) <= set(range(108, 115)) | set(range(142, 147))
    assert {109, 144} <= set(cols)
    assert set(rows[cols >= 142]) <= set(range(125, 131))


def test_rasterise_degenerate_drawing():
    dot = np.asarray(rasterise_strokes([[[5], [5], [0]]]))
    assert dot.min() == 0 and (dot < 255).sum() < 20
    with pytest.raises(ValueError, match="no points"):
        rasterise_strokes([])


def test_quickdraw_bad_line(tmp_path):
    (tmp_path / "cat.ndjson").write_text('{"drawing": []}\n[1, 2]\n')
    with pytest.raises(ManifestError, match="drawing 1 is not a JSON object"):
        quickdraw(tmp_path, "qd")
    (tmp_path / "cat.ndjson").write_text('{"word": "cat"}\n')
    with pytest.raises(ValueError, match="cat.ndjson#0: not a Quick, Draw! drawing.*drawing"):
        load_image(tmp_path / "cat.ndjson", "0")


def test_imagenet(tmp_path):
    (tmp_path / "LOC_synset_mapping.txt").write_text(
        "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\nn02012849 crane\n"
    )
    for split, wnids in {"train": ["n01443537", "n01440764"], "val": ["n01440764", "n09999999"]}.items():
        for wnid in wnids:
            write_png(tmp_path / split / wnid / f"{wnid}_1.JPEG")
    m = imagenet(tmp_path, "imagenet")
    assert m.classes == ("tench", "goldfish", "n09999999")  # no mapping line -> the wnid
    assert m.ids == (
        "train/n01440764/n01440764_1.JPEG",
        "train/n01443537/n01443537_1.JPEG",
        "val/n01440764/n01440764_1.JPEG",
        "val/n09999999/n09999999_1.JPEG",
    )
    assert m.labels == (0, 1, 0, 2)
    assert m.splits == ("train", "train", "val", "val")
    assert set(m.domains) == {"photo"}
    assert imagenet(tmp_path, "imagenet", splits=["val"]).classes == ("tench", "n09999999")

    (tmp_path / "LOC_synset_mapping.txt").unlink()
    (tmp_path / "synset_words.txt").write_text("n01440764 tench, Tinca tinca\n")
    assert imagenet(tmp_path, "imagenet").classes == ("tench", "n01443537", "n09999999")


def test_demo_builder_and_npz_source(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    np.savez_compressed(tmp_path / "mnist-demo.npz", images=images, labels=np.array([3, 1, 4, 1, 5, 9]))
    m = demo(tmp_path, "demo", n_train=4)
    assert m.ids[5] == "mnist-demo.npz#5"
    assert m.labels == (3, 1, 4, 1, 5, 9)
    assert m.splits == ("train",) * 4 + ("test",) * 2
    assert np.array_equal(np.asarray(load_image(*m.path_of(5))), images[5])


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "absent.png", None)
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "absent-images-idx3-ubyte.gz", "0")
    write_mnist(tmp_path, n=2)
    with pytest.raises(IndexError, match="#2: index out of range, the file holds 2 items"):
        load_image(tmp_path / "t10k-images-idx3-ubyte.gz", "2")
    with pytest.raises(ValueError, match="fragment must be an integer"):
        load_image(tmp_path / "t10k-images-idx3-ubyte.gz", "x")
    with pytest.raises(ValueError, match="name one with '#<index>'"):
        load_image(tmp_path / "t10k-images-idx3-ubyte.gz", None)
    write_png(tmp_path / "a.png")
    with pytest.raises(ValueError, match="takes no '#fragment'"):
        load_image(tmp_path / "a.png", "1")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "big.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "big.jpg").read_bytes()[:300])
    with pytest.raises(OSError, match="cut.jpg"):
        load_image(tmp_path / "cut.jpg", None)


def test_load_image_rewritten_container_is_reread(tmp_path):
    write_mnist(tmp_path, n=2)
    load_image(tmp_path / "t10k-images-idx3-ubyte.gz", "1")
    write_mnist(tmp_path, n=3)
    assert np.asarray(load_image(tmp_path / "t10k-images-idx3-ubyte.gz", "2")).shape == (28, 28)


@pytest.mark.parametrize(
    "mode, colour, expected_mode, expected",
    [
        ("L", 77, "L", 77),
        ("1", 1, "L", 255),
        ("LA", (0, 0), "L", 255),  # fully transparent -> white background
        ("RGBA", (255, 0, 0, 255), "RGB", (255, 0, 0)),
        ("RGBA", (255, 0, 0, 0), "RGB", (255, 255, 255)),
        ("CMYK", (0, 0, 0, 0), "RGB", (255, 255, 255)),
    ],
)
def test_load_image_modes(tmp_path, mode, colour, expected_mode, expected):
    path = tmp_path / ("x.tiff" if mode == "CMYK" else "x.png")
    write_png(path, colour, mode)
    image = load_image(path, None)
    assert image.mode == expected_mode and image.getpixel((1, 1)) == expected


def test_load_image_palette(tmp_path):
    Image.new("RGB", (4, 4), (200, 100, 50)).convert("P").save(tmp_path / "p.gif")
    image = load_image(tmp_path / "p.gif", None)
    assert image.mode == "RGB"
    assert np.abs(np.subtract(image.getpixel((0, 0)), (200, 100, 50))).max() < 30


def test_load_dataset_root_precedence(tmp_path, monkeypatch):
    write_mnist(tmp_path / "env", n=2)
    write_mnist(tmp_path / "arg", n=3)
    monkeypatch.setenv("FEATURESTORE_MNIST_ROOT", str(tmp_path / "env"))
    assert len(load_dataset("mnist-test")) == 2
    assert len(load_dataset("mnist-test", data_root=tmp_path / "arg")) == 3
    monkeypatch.setenv("FEATURESTORE_MNIST_ROOT", str(tmp_path / "nowhere"))
    with pytest.raises(ManifestError, match="nowhere does not exist.*set FEATURESTORE_MNIST_ROOT=PATH"):
        load_dataset("mnist-test")
