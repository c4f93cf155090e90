"""Image files decode to the pixels a viewer shows: EXIF orientation applied, 16-bit, 32-bit and
float grey scaled (not binarised), transparency on white; absurd shapes and sizes fail the image
with a clear error instead of taking gigabytes."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_manifests.sources import load_image

PROJECT = Path(__file__).resolve().parents[2]
UPRIGHT = np.random.default_rng(0).integers(0, 256, (3, 5, 3), dtype=np.uint8)  # (H, W, RGB), no symmetry

# What a file with EXIF orientation k stores, so that a viewer shows UPRIGHT (EXIF 2.32, tag 0x0112):
# 2 mirrored, 3 rotated 180, 4 flipped, 5 transposed, 6 turned 90 clockwise to view, 7 transversed,
# 8 turned 90 anticlockwise to view.
STORED = {
    2: UPRIGHT[:, ::-1],
    3: UPRIGHT[::-1, ::-1],
    4: UPRIGHT[::-1],
    5: UPRIGHT.transpose(1, 0, 2),
    6: np.rot90(UPRIGHT, 1),
    7: np.rot90(UPRIGHT.transpose(1, 0, 2), 2),
    8: np.rot90(UPRIGHT, -1),
}


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_exif_orientation_is_applied(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.png"
    Image.fromarray(np.ascontiguousarray(STORED[orientation])).save(path, exif=exif)
    assert Image.open(path).size != (5, 3) or orientation in (2, 3, 4)  # the file really is turned
    image = load_image(path, None)
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), UPRIGHT)


SIXTEEN = np.array([[0, 128, 129, 257], [385, 386, 32896, 65535]], dtype=np.uint16)
SIXTEEN_AS_8 = np.array([[0, 0, 1, 1], [1, 2, 128, 255]], dtype=np.uint8)  # round(v / 257)


@pytest.mark.parametrize("mode, array, suffix", [
    ("I;16", SIXTEEN, ".png"),
    ("I;16B", SIXTEEN.astype(">u2"), ".tif"),
    ("I", SIXTEEN.astype(np.int32), ".tif"),
])
def test_16_and_32_bit_grey_is_scaled_not_binarised(tmp_path, mode, array, suffix):
    path = tmp_path / f"grey{suffix}"
    Image.fromarray(array).save(path)
    assert Image.open(path).mode == mode
    image = load_image(path, None)
    assert image.mode == "L"
    np.testing.assert_array_equal(np.asarray(image), SIXTEEN_AS_8)


@pytest.mark.parametrize("values, expected", [
    ([[0.0, 0.5], [0.25, 1.0]], [[0, 128], [64, 255]]),  # all in [0, 1]: x 255
    ([[0.0, 2.0], [100.4, 254.6]], [[0, 2], [100, 255]]),  # else [0, 255]
])
def test_float_grey_is_read_as_0_1_or_0_255(tmp_path, values, expected):
    path = tmp_path / "f.tif"
    Image.fromarray(np.array(values, dtype=np.float32)).save(path)
    assert Image.open(path).mode == "F"
    np.testing.assert_array_equal(np.asarray(load_image(path, None)), np.array(expected, dtype=np.uint8))


@pytest.mark.parametrize("array, message", [
    (np.array([[0, 70000]], dtype=np.int32), "outside 0..65535"),
    (np.array([[-1.0, 0.5]], dtype=np.float32), "outside [0, 255]"),
    (np.array([[0.0, 300.0]], dtype=np.float32), "outside [0, 255]"),
    (np.array([[0.5, np.nan, 0.2]], dtype=np.float32), "float image with 1 NaN or infinite pixels"),
])
def test_grey_values_out_of_range_fail_naming_the_file(tmp_path, array, message):
    path = tmp_path / "odd.tif"
    Image.fromarray(array).save(path)
    with pytest.raises(OSError, match="odd.tif") as err:
        load_image(path, None)
    assert message in str(err.value)


def test_transparency_goes_on_white_and_other_modes_convert(tmp_path):
    grey, alpha = np.array([[10, 200, 50]], np.uint8), np.array([[255, 0, 128]], np.uint8)
    Image.fromarray(np.stack([grey, alpha], axis=-1), "LA").save(tmp_path / "la.png")
    composite = grey * (alpha / 255) + 255 * (1 - alpha / 255)  # 10, 255, 152.1
    la = load_image(tmp_path / "la.png", None)
    assert la.mode == "L"
    np.testing.assert_allclose(np.asarray(la), composite, atol=1)

    palette = Image.fromarray(np.array([[0, 1, 2]], np.uint8), "P")
    palette.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0])
    palette.save(tmp_path / "p.png", transparency=1)
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "p.png", None)),
                                  [[[255, 0, 0], [255, 255, 255], [0, 255, 0]]])

    Image.fromarray(np.array([[7, 8]], np.uint8)).save(tmp_path / "l-trns.png", transparency=7)
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "l-trns.png", None)), [[255, 8]])

    cmyk = np.array([[[100, 50, 20, 40], [0, 0, 0, 255]]], np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.tif")
    c, k = cmyk[..., :3].astype(int), cmyk[..., 3:].astype(int)
    expected = np.rint((255 - c) * (255 - k) / 255)  # the naive CMYK -> RGB
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "cmyk.tif", None)), expected)

    bits = np.array([[True, False, True]])
    Image.fromarray(bits).save(tmp_path / "one.png")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "one.png", None)), bits * 255)


def test_images_over_the_decompression_bomb_limit_fail_naming_the_file(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((60, 60), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 3600 pixels: where Pillow only warns
    with pytest.raises(OSError, match=r"big.png: refused as a possible decompression bomb: 60x60 is 3,600 pixels"):
        load_image(tmp_path / "big.png", None)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # where Pillow refuses
    with pytest.raises(OSError, match="big.png: refused as a possible decompression bomb"):
        load_image(tmp_path / "big.png", None)


MEASURE = textwrap.dedent("""
    import json, resource, sys
    from concurrent.futures import ThreadPoolExecutor
    import numpy as np
    from PIL import Image
    from data_manifests.manifest import Manifest
    from pipelines.extract.backbone import InputSpec
    from pipelines.extract.reader import read_chunk

    root = sys.argv[1]
    Image.fromarray(np.zeros((1, 16000), np.uint8)).save(root + "/thin.png")
    Image.fromarray(np.zeros((20, 200), np.uint8)).save(root + "/wide.png")
    manifest = Manifest("m", root, ("a",), ("thin.png", "wide.png"), ("thin.png", "wide.png"), (0, 0),
                        ("test",) * 2, ("photo",) * 2)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with ThreadPoolExecutor(2) as pool:
        chunk = read_chunk(manifest, range(2), InputSpec(224, 3, (-1.0, 1.0)), pool)
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"growth_mb": growth / 1024, "failed": chunk.failed.tolist(), "errors": chunk.errors}))
""")


def test_a_long_thin_image_fails_without_taking_gigabytes(tmp_path):
    """A 16000x1 PNG upsampled to a 224-pixel short side took 3.5 GB; now it fails in a few MB,
    and a 10:1 image is still read."""
    done = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path)], cwd=PROJECT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["growth_mb"] < 100, doc
    assert doc["failed"] == [True, False], doc
    assert doc["errors"][0] == ("ValueError: image is 16000x1 pixels: its aspect ratio is over 10:1, "
                                "the limit of the resize and centre crop to the model's square input")


def test_an_extraction_fails_a_decompression_bomb_in_one_line_without_pillows_warning(tmp_path):
    """Pillow warns (2 lines on stderr) on opening an image just over its limit; the reader refuses
    it as a failed image, so nothing else reaches stderr."""
    Image.fromarray(np.zeros((60, 60), np.uint8)).save(tmp_path / "big.png")
    script = textwrap.dedent("""
        import sys
        from PIL import Image
        import pipelines.extract.reader  # the extraction's reader, as `featurestore extract` imports it
        from data_manifests.sources import load_image
        Image.MAX_IMAGE_PIXELS = 2000
        try:
            load_image(sys.argv[1], None)
        except OSError as e:
            print(e)
    """)
    done = subprocess.run([sys.executable, "-W", "default", "-c", script, str(tmp_path / "big.png")],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert "refused as a possible decompression bomb" in done.stdout, done.stdout + done.stderr
    assert done.stderr == ""
