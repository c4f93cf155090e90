"""Builders for dense-prediction datasets: images with a per-pixel mask or depth target column.

Each builder reads a dataset's usual layout and sets `targets` and `target_info` (see
data_manifests/targets.py for the decoders and their conventions). Segmentation datasets have no
image-level label: their rows get the single class "all", except Cityscapes (the city), NYUv2 (the
scene type) and the MNIST and Quick, Draw! sets (the digit or drawing class).

This module adds its builders to `BUILDERS` (and the embedded demo set to `EMBEDDED_ROOTS`) when
imported; builders.py imports it at its end, so the dataset YAMLs find them.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from data_manifests.builders import BUILDERS, DEMO_DIR, EMBEDDED_ROOTS, _manifest, demo, mnist_idx, quickdraw
from data_manifests.manifest import Manifest, ManifestError
from data_manifests.targets import IGNORE_INDEX

NO_IMAGE_LABEL = ("all",)
# Class names as the datasets' official code lists them (VOC devkit; mmsegmentation's ADE20K and
# COCO-Stuff dataset classes, ADE20K's 'bed ' without its trailing space; cityscapesScripts train ids).
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag")
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle")
COCO_STUFF_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush", "banner", "blanket", "branch", "bridge", "building-other",
    "bush", "cabinet", "cage", "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes",
    "clouds", "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble",
    "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other", "fruit",
    "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves", "light", "mat", "metal",
    "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow", "plant-other",
    "plastic", "platform", "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug",
    "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone",
    "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable", "wall-brick",
    "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other",
    "waterdrops", "window-blind", "window-other", "wood")
DIGIT_SEG_CLASSES = ("background", *(str(d) for d in range(10)))
# NYUv2 evaluation settings (BTS's bts_eval.py): the Eigen crop keeps rows 45:471 and columns
# 41:601 of the 480x640 map, and depths are scored up to 10 m.
NYU_DEPTH_INFO = {"decode": "nyu-depth-mm", "unit": "m", "max_depth": 10.0, "eval_crop": "eigen"}


def _with_mask(manifest: Manifest, masks: list[str], decode: str, classes: tuple[str, ...]) -> Manifest:
    """The manifest with a mask column (one source per row) decoded by `decode` into `classes`."""
    info = {"decode": decode, "classes": list(classes), "ignore_index": IGNORE_INDEX}
    return dataclasses.replace(manifest, targets={"mask": tuple(masks)}, target_info={"mask": info})


def _folder(path: Path, name: str, expected: str) -> Path:
    """`path` when it is a folder; else a ManifestError naming it and the layout expected at the root."""
    if not path.is_dir():
        raise ManifestError(f"dataset {name!r}: {path} does not exist; expected {expected}")
    return path


def _files(folder: Path, suffix: str) -> list[str]:
    """Sorted names of the files in `folder` ending in `suffix` (case-sensitive, as the datasets name them)."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_file() and e.name.endswith(suffix))


def _without(what: str, missing: list[str], name: str) -> None:
    """Refuse images whose label file is absent (the first few named)."""
    if missing:
        raise ManifestError(f"dataset {name!r}: {len(missing)} image(s) without their {what}: "
                            f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}")


def voc2012(root: Path, name: str, splits: tuple[str, ...] = ("train", "val")) -> Manifest:
    """PASCAL VOC 2012 segmentation: root is `VOCdevkit/VOC2012`, with `JPEGImages/<id>.jpg`,
    `SegmentationClass/<id>.png` (palette indices: 21 classes, 0 = background, 255 = boundary and
    difficult, ignored) and the image ids of each split in `ImageSets/Segmentation/<split>.txt`."""
    layout = "the VOC2012 folder (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/)"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        _folder(root / folder, name, layout)
    masks = set(_files(root / "SegmentationClass", ".png"))
    rows, mask_sources, missing = [], [], []
    for split in splits:
        lists = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        try:
            ids = [line.strip() for line in lists.read_text(encoding="utf-8").splitlines() if line.strip()]
        except OSError as e:
            raise ManifestError(f"dataset {name!r}: cannot read the {split} list {lists}: {e}") from e
        for id_ in ids:
            if f"{id_}.png" not in masks:
                missing.append(id_)
            rows.append((f"JPEGImages/{id_}.jpg", 0, split, "photo"))
            mask_sources.append(f"SegmentationClass/{id_}.png")
    _without("SegmentationClass/<id>.png", missing, name)
    return _with_mask(_manifest(name, root, NO_IMAGE_LABEL, rows), mask_sources, "voc-palette", VOC_CLASSES)


def _paired_folders(root: Path, images: str, annotations: str, folders: tuple[tuple[str, str], ...], name: str,
                    what: str) -> tuple[list[tuple[str, int, str, str]], list[str]]:
    """Rows (source, label 0, split, "photo") of every `root/<images>/<folder>/*.jpg` and the mask
    source `<annotations>/<folder>/<stem>.png` of each, for (folder, split) in `folders`.
    ManifestError (one line) for a missing folder or images without their `what`."""
    rows, masks, missing = [], [], []
    for folder, split in folders:
        layout = f"{images}/{folder}/ and {annotations}/{folder}/ under the {name} root"
        labelled = set(_files(_folder(root / annotations / folder, name, layout), ".png"))
        for file in _files(_folder(root / images / folder, name, layout), ".jpg"):
            stem = file.removesuffix(".jpg")
            if f"{stem}.png" not in labelled:
                missing.append(file)
            rows.append((f"{images}/{folder}/{file}", 0, split, "photo"))
            masks.append(f"{annotations}/{folder}/{stem}.png")
    _without(what, missing, name)
    return rows, masks


def ade20k(root: Path, name: str) -> Manifest:
    """ADE20K SceneParsing (150 classes): `root/ADEChallengeData2016/images/{training,validation}/*.jpg`
    with `annotations/<same folder>/<stem>.png` (0 = other, ignored; 1..150 -> classes 0..149).
    Splits: training -> train, validation -> val."""
    _folder(root / "ADEChallengeData2016", name,
            "the folder holding ADEChallengeData2016/ (images/ and annotations/, each with training/ and validation/)")
    rows, masks = _paired_folders(root, "ADEChallengeData2016/images", "ADEChallengeData2016/annotations",
                                  (("training", "train"), ("validation", "val")), name, "annotation PNG")
    return _with_mask(_manifest(name, root, NO_IMAGE_LABEL, rows), masks, "ade20k", ADE20K_CLASSES)


def cityscapes(root: Path, name: str, splits: tuple[str, ...] = ("train", "val")) -> Manifest:
    """Cityscapes fine annotations: `root/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png` with
    `root/gtFine/<split>/<city>/<stem>_gtFine_labelIds.png` (label ids -> the 19 train ids, the rest
    ignored). The image label is the city (classes: the sorted city names). The public test split's
    labelIds are all void, so the default splits are train and val."""
    layout = "leftImg8bit/<split>/<city>/ and gtFine/<split>/<city>/ under the Cityscapes root"
    found = []
    for split in splits:
        images = _folder(root / "leftImg8bit" / split, name, layout)
        labels = _folder(root / "gtFine" / split, name, layout)
        for city in sorted(e.name for e in os.scandir(images) if e.is_dir()):
            labelled = set(_files(labels / city, "_gtFine_labelIds.png")) if (labels / city).is_dir() else set()
            for file in _files(images / city, "_leftImg8bit.png"):
                found.append((split, city, file.removesuffix("_leftImg8bit.png"), labelled))
    _without("gtFine/<split>/<city>/<stem>_gtFine_labelIds.png",
             [f"{city}/{stem}" for _, city, stem, labelled in found if f"{stem}_gtFine_labelIds.png" not in labelled],
             name)
    cities = sorted({city for _, city, _, _ in found})
    rows = [(f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png", cities.index(city), split, "photo")
            for split, city, stem, _ in found]
    masks = [f"gtFine/{split}/{city}/{stem}_gtFine_labelIds.png" for split, city, stem, _ in found]
    return _with_mask(_manifest(name, root, cities, rows), masks, "cityscapes-labelids", CITYSCAPES_CLASSES)


def coco_stuff(root: Path, name: str, annotations: str = "annotations") -> Manifest:
    """COCO-Stuff-164k with the 171 classes (80 things, 91 stuff): `root/images/{train2017,val2017}/*.jpg`
    with `root/<annotations>/<same folder>/<stem>.png` from stuffthingmaps_trainval2017.zip (COCO id
    - 1, 255 unlabeled; mmsegmentation's `_labelTrainIds.png` conversions beside them are not read).
    Splits: train2017 -> train, val2017 -> val."""
    rows, masks = _paired_folders(root, "images", annotations, (("train2017", "train"), ("val2017", "val")), name,
                                  "stuffthingmaps PNG")
    return _with_mask(_manifest(name, root, NO_IMAGE_LABEL, rows), masks, "coco-stuff-171", COCO_STUFF_CLASSES)


def nyu_depth_v2(root: Path, name: str) -> Manifest:
    """NYU Depth v2 in the BTS layout: train `root/sync/<scene>_<nnnn><x>/rgb_<k>.jpg` and test
    `root/official_splits/test/<scene type>/rgb_<k>.jpg`, each beside `sync_depth_<k>.png` (uint16
    millimetres -> metres, 0 invalid; an image without it has no depth). The image label is the
    scene type (e.g. kitchen_0028b -> kitchen). target_info records the evaluation settings: the
    Eigen crop and a 10 m cap."""
    layout = "sync/<scene>/ (train) and official_splits/test/<scene type>/ (test) under the nyu_depth_v2 root"
    found = []
    for base, split in (("sync", "train"), ("official_splits/test", "test")):
        for scene in sorted(e.name for e in os.scandir(_folder(root / base, name, layout)) if e.is_dir()):
            scene_type = scene if split == "test" else scene.rsplit("_", 1)[0]
            files = set(_files(root / base / scene, ".png"))
            for image in _files(root / base / scene, ".jpg"):
                if image.startswith("rgb_"):
                    depth = "sync_depth_" + image.removeprefix("rgb_").removesuffix(".jpg") + ".png"
                    found.append((f"{base}/{scene}/{image}", scene_type, split,
                                  f"{base}/{scene}/{depth}" if depth in files else ""))
    scene_types = sorted({scene_type for _, scene_type, _, _ in found})
    rows = [(image, scene_types.index(scene_type), split, "photo") for image, scene_type, split, _ in found]
    built = _manifest(name, root, scene_types, rows)
    return dataclasses.replace(built, targets={"depth": tuple(depth for *_, depth in found)},
                               target_info={"depth": dict(NYU_DEPTH_INFO)})


def _digit_masks(manifest: Manifest, decode: str, classes: tuple[str, ...]) -> Manifest:
    """Each row's mask is its own image with its label + 1 on the foreground: source `<image>:<label + 1>`."""
    masks = [f"{source}:{label + 1}" for source, label in zip(manifest.sources, manifest.labels)]
    return _with_mask(manifest, masks, decode, classes)


def mnist_seg(root: Path, name: str, prefix: str = "t10k", split: str | None = None) -> Manifest:
    """MNIST-seg: the `mnist_idx` digits, each with a mask of 11 classes: pixels > 127 are 1 + the
    digit, the rest 0 = background."""
    return _digit_masks(mnist_idx(root, name, prefix=prefix, split=split), "mnist-seg", DIGIT_SEG_CLASSES)


def mnist_seg_demo(root: Path, name: str, n_train: int = 1000) -> Manifest:
    """MNIST-seg on the embedded demo digits (`demo/mnist-demo.npz`, the `demo` split: the first
    n_train "train", the rest "test")."""
    return _digit_masks(demo(root, name, n_train=n_train), "mnist-seg", DIGIT_SEG_CLASSES)


def quickdraw_seg(root: Path, name: str, recognized_only: bool = False) -> Manifest:
    """Quick,Draw!-seg: the `quickdraw` drawings, each with a mask on the rasterised image: stroke
    pixels are 1 + the class index, the rest 0 = background (classes: background + the drawing classes)."""
    drawings = quickdraw(root, name, recognized_only=recognized_only)
    return _digit_masks(drawings, "quickdraw-seg", ("background", *drawings.classes))


BUILDERS.update({"voc2012": voc2012, "ade20k": ade20k, "cityscapes": cityscapes, "coco_stuff": coco_stuff,
                 "nyu_depth_v2": nyu_depth_v2, "mnist_seg": mnist_seg, "mnist_seg_demo": mnist_seg_demo,
                 "quickdraw_seg": quickdraw_seg})
EMBEDDED_ROOTS["mnist_seg_demo"] = DEMO_DIR
