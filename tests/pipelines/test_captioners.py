"""BlipCaptioner on a tiny random BLIP folder: deterministic captions, batching does not change
them, the key follows the options, and a model missing from the local cache is refused."""

import numpy as np
import pytest
from PIL import Image

from pipelines.extract.weights import WeightsError
from pipelines.extract.captioners import BlipCaptioner


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(40, 50), (30, 80)]
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for size in sizes] + [Image.new("L", (20, 20), 128)]


def test_captions_are_deterministic_and_batching_does_not_change_them(tiny_blip):
    batched = BlipCaptioner(tiny_blip, max_new_tokens=8, batch_size=2)
    captions = batched.caption(images())
    assert len(captions) == 3 and all(isinstance(c, str) and c and c == c.strip() for c in captions)
    one_by_one = BlipCaptioner(tiny_blip, max_new_tokens=8, batch_size=1)
    assert one_by_one.caption(images()) == captions
    assert one_by_one.key == batched.key and one_by_one.key.startswith("blip-") and len(one_by_one.key) == 17
    assert batched.info == {"model": str(tiny_blip), "digest": batched.info["digest"], "max_new_tokens": 8}


def test_key_changes_with_max_new_tokens(tiny_blip):
    assert BlipCaptioner(tiny_blip, max_new_tokens=8).key != BlipCaptioner(tiny_blip, max_new_tokens=9).key


def test_a_model_not_in_the_local_cache_is_refused(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsError, match="Salesforce/blip-image-captioning-base is neither a model folder"):
        BlipCaptioner(None)
