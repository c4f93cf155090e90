"""`--prompt tags`: each image's prompt from the classes present in its mask (TADP's oracle tags)
or from predicted tags in a CSV; recorded in the run spec; refusals in one line."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import pipelines.extract.runner as runner
from cli.main import app
from data_manifests.manifest import Manifest, load_dataset
from featurestore.store import FeatureStore
from pipelines.extract.prompts import image_tags, parse_prompt, prompts_for

CLASSES = ["background", "aeroplane", "bicycle", "potted plant"]


def seg_manifest(root, masks, with_masks=True) -> Manifest:
    ids = tuple(f"im{i}.png" for i in range(len(masks)))
    for i, mask in enumerate(masks):
        Image.new("L", (3, 2)).save(root / ids[i])
        if mask is not None:
            Image.fromarray(mask, mode="L").save(root / f"m{i}.png")
    targets = {"mask": tuple(f"m{i}.png" if m is not None else "" for i, m in enumerate(masks))} if with_masks else {}
    info = {"mask": {"decode": "voc-palette", "classes": CLASSES, "ignore_index": 255}} if with_masks else {}
    return Manifest(name="toy-seg", root=root, classes=("a",), ids=ids, sources=ids, labels=(0,) * len(ids),
                    splits=("test",) * len(ids), domains=("photo",) * len(ids), targets=targets, target_info=info)


def test_oracle_tags_are_the_classes_in_each_mask(tmp_path):
    first = np.array([[3, 3, 0], [255, 1, 0]], dtype=np.uint8)  # potted plant, background, aeroplane; 255 ignored
    second = np.array([[2, 2, 2], [2, 255, 2]], dtype=np.uint8)  # bicycle only
    manifest = seg_manifest(tmp_path, [first, second])
    source = parse_prompt("tags")
    tags = image_tags(source, manifest)
    # in class order, whatever order the pixels hold them in, joined by a space (TADP's captions)
    assert tags == ["background aeroplane potted plant", "bicycle"]
    assert prompts_for(source, manifest.ids, manifest.class_names, tags=tags) == tags
    templated = parse_prompt("tags:a photo of {}")
    assert prompts_for(templated, manifest.ids, manifest.class_names, tags=image_tags(templated, manifest)) == [
        "a photo of background aeroplane potted plant", "a photo of bicycle"]
    assert source.spec == "tags:{}" and templated.spec == "tags:a photo of {}"


def test_predicted_tags_from_a_file(tmp_path):
    manifest = seg_manifest(tmp_path, [np.zeros((2, 2), np.uint8)] * 2, with_masks=False)
    table = tmp_path / "tags.csv"
    table.write_text('id,tags\nim1.png,"dog, sofa"\nim0.png,cat\n')
    source = parse_prompt(f"tags:{table}")
    assert prompts_for(source, manifest.ids, manifest.class_names, tags=image_tags(source, manifest)) == [
        "cat", "dog, sofa"]
    assert source.spec == f"tags:sha256:{hashlib.sha256(table.read_bytes()).hexdigest()}"
    table.write_text("id,tags\nim0.png,cat\n")
    with pytest.raises(ValueError, match=r"tags.csv has no tags for 1 images: im1.png"):
        image_tags(parse_prompt(f"tags:{table}"), manifest)


def test_refusals(tmp_path):
    no_masks = seg_manifest(tmp_path, [np.zeros((2, 2), np.uint8)], with_masks=False)
    with pytest.raises(ValueError, match="has no mask column; give predicted tags with --prompt tags:FILE"):
        image_tags(parse_prompt("tags"), no_masks)
    (tmp_path / "b").mkdir()
    one_missing = seg_manifest(tmp_path / "b", [np.zeros((2, 2), np.uint8), None])
    with pytest.raises(ValueError, match="image 'im1.png' of 'toy-seg' has no mask"):
        image_tags(parse_prompt("tags"), one_missing)
    with pytest.raises(ValueError, match="no such file, and not a template"):
        parse_prompt("tags:nothing-here.csv")


def test_extract_conditions_each_image_on_its_mask_tags(tmp_path, tiny_sd, monkeypatch):
    """Through `extract`: the prompts given to the backbone are the oracle tags of each MNIST-seg
    digit (background and its digit), and the run spec records the prompt source."""
    seen = []
    real = runner.job_prompts
    monkeypatch.setattr(runner, "job_prompts", lambda *a: seen.append(real(*a)) or seen[-1])
    (tmp_path / "sd.json").write_text(json.dumps({"image_size": 64}))
    store = tmp_path / "s.zarr"
    result = CliRunner().invoke(app, [
        "extract", "--dataset", "mnist-seg-demo", "--limit", "3", "--backbone", "sd15", "--weights", str(tiny_sd),
        "--backbone-config", str(tmp_path / "sd.json"), "--store", str(store), "--prompt", "tags:a photo of {}",
        "--timesteps", "200", "--blocks", "down0", "--json"])
    assert result.exit_code == 0, result.output
    manifest = load_dataset("mnist-seg-demo").head(3)
    assert seen == [[f"a photo of background {manifest.classes[label]}" for label in manifest.labels]]
    (run,) = FeatureStore.open(str(store)).runs()
    assert run.spec["prompt"] == "tags:a photo of {}"
