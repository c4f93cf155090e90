"""A depth target's eval_crop is "eigen" or absent: anything else would be silently ignored by scoring."""

import pytest

from data_manifests.manifest import Manifest, ManifestError


def depth_manifest(root, info: dict) -> Manifest:
    ids = ("a", "b")
    return Manifest(name="t", root=root, classes=("x",), ids=ids, sources=("a.png", "b.png"), labels=(0, 0),
                    splits=("train", "test"), domains=("photo",) * 2, targets={"depth": ("a_d.png", "b_d.png")},
                    target_info={"depth": info})


@pytest.mark.parametrize("crop", [None, "eigen", "absent"])
def test_eigen_or_no_crop_is_accepted(tmp_path, crop):
    info = {"decode": "nyu-depth-mm", "unit": "m", "max_depth": 10.0}
    if crop != "absent":
        info["eval_crop"] = crop
    depth_manifest(tmp_path, info).validate()


@pytest.mark.parametrize("crop", ["garg", "Eigen", 1])
def test_another_eval_crop_is_refused_in_one_line(tmp_path, crop):
    info = {"decode": "nyu-depth-mm", "unit": "m", "max_depth": 10.0, "eval_crop": crop}
    with pytest.raises(ManifestError) as e:
        depth_manifest(tmp_path, info).validate()
    assert f"target_info 'eval_crop' must be 'eigen' or absent, got {crop!r}" in str(e.value)
    assert "\n" not in str(e.value)
