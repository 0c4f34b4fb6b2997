import io

import numpy as np
import pytest
from PIL import Image

from kmim.contract.images import ImageDecodeError, decode_rgb


def _encode(img, fmt="PNG"):
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    "mode,fmt",
    [
        ("L", "PNG"),
        ("LA", "PNG"),
        ("RGBA", "PNG"),
        ("P", "PNG"),
        ("CMYK", "JPEG"),
        ("I;16", "PNG"),
        ("1", "PNG"),
        ("RGB", "JPEG"),
        ("RGB", "WEBP"),
    ],
)
def test_every_mode_decodes_to_rgb(mode, fmt):
    img = Image.new("RGB", (9, 7), (200, 100, 50)).convert(mode) if mode != "I;16" else None
    if mode == "I;16":
        img = Image.fromarray(np.full((7, 9), 40000, dtype=np.uint16))
        assert img.mode.startswith("I;16")
    out = decode_rgb(_encode(img, fmt))
    assert out.mode == "RGB" and out.size == (9, 7)


def test_sixteen_bit_images_are_scaled_not_clipped():
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    out = np.asarray(decode_rgb(_encode(Image.fromarray(arr))))
    assert out[0, :, 0].tolist() == [0, 128, 255]


def test_palette_with_transparency_decodes():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([255, 0, 0] * 256)
    img.info["transparency"] = 0
    assert decode_rgb(_encode(img)).getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty"),
        (b"not an image", "cannot decode"),
        (_encode(Image.new("RGB", (8, 8)))[:40], "cannot decode"),
    ],
)
def test_undecodable_bytes_raise_a_named_reason(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_rgb(data)
