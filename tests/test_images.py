"""Reading image files (ace.images): upright, 16-bit scaled, the same in every loader."""

import json

import numpy as np
import pytest
from PIL import Image

from ace.data.manifest import LCUManifest
from ace.images import open_image


def gradient16(h=8, w=16):
    """A 16-bit greyscale gradient, 0 ... 65535 along each row."""
    return np.tile(np.linspace(0, 65535, w).round().astype(np.uint16), (h, 1))  # (H, W)


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = gradient16()
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)  # mode I;16
    for mode in ("L", "RGB"):
        got = np.asarray(open_image(path, mode), dtype=np.int64)
        expected = np.round(values / 257).astype(np.int64)  # by hand: 65535 -> 255
        got = got if mode == "L" else got[..., 0]
        assert np.array_equal(got, expected)
    # what PIL alone does, which this replaces: almost everything white
    with Image.open(path) as im:
        assert (np.asarray(im.convert("L")) == 255).mean() > 0.9


def test_sixteen_bit_file_of_eight_bit_values_is_read_as_is(tmp_path):
    """A 0/255 mask saved from a uint16 array: scaled by 1/257 it became 0/1, which
    preprocess_mask reads as all zero, i.e. the whole image."""
    from ace.conditioning import preprocess_mask

    values = np.zeros((16, 16), np.uint16)
    values[4:8, 4:12] = 255
    path = tmp_path / "mask16.png"
    Image.fromarray(values).save(path)
    got = open_image(path, "L")
    assert np.array_equal(np.asarray(got), values.astype(np.uint8))
    assert preprocess_mask(got, (16, 16)).mean().item() == 32 / 256  # the drawn region


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_is_applied(tmp_path, orientation):
    """A phone photo stored sideways with an orientation tag reads as a viewer shows it."""
    pixels = np.zeros((20, 40, 3), np.uint8)  # (H, W, 3): a wide image ...
    pixels[:, :10] = 255  # ... white on its left
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.png"
    Image.fromarray(pixels).save(path, exif=exif)
    got = np.asarray(open_image(path, "RGB"))
    # by hand: 6 turns the stored pixels 90 degrees clockwise, 8 counter-clockwise, 3 by 180
    turns = {1: 0, 3: 2, 6: -1, 8: 1}[orientation]
    assert np.array_equal(got, np.rot90(pixels, turns))


def test_manifest_loads_images_through_it(tmp_path):
    """The manifest reads a 16-bit mask as the CLI does: half set, not all set."""
    values = gradient16(16, 16)
    Image.fromarray(values).save(tmp_path / "m.png")
    Image.new("RGB", (16, 16), (10, 20, 30)).save(tmp_path / "a.png")
    record = {
        "turns": [{"instruction": "edit {image}", "images": ["a.png"], "masks": ["m.png"]}],
        "target": "a.png",
        "task": "repaint",
    }
    (tmp_path / "manifest.jsonl").write_text(json.dumps(record) + "\n")
    mask = np.asarray(LCUManifest(tmp_path)[0].masks[0])
    assert mask.dtype == np.uint8 and np.array_equal(mask, np.round(values / 257))


def test_an_unreadable_file_raises_oserror(tmp_path):
    (tmp_path / "x.png").write_bytes(b"not a png")
    with pytest.raises(OSError):
        open_image(tmp_path / "x.png", "RGB")
