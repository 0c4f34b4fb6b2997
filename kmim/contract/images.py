"""Decoding image bytes into RGB, whatever the mode the file was saved in."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm", "pbm")

# Decompression-bomb guard at a size real datasets reach (the PIL default warns at 89 MP and errors at twice
# that). kmim refuses anything above MAX_PIXELS itself, from the header, before a single pixel is decoded.
MAX_PIXELS = 300_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

# EXIF orientation is ignored, in every stage and in the trainer alike: pixels are used as stored, which is
# what torchvision / timm loaders and WebDataset's decoders do, so tokens and training views always agree.


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image (the caller names the key and counts the skip)."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (L, LA, RGBA, P, CMYK, I;16, I, F, 1) as 8-bit RGB."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        # High bit depth: PIL's own convert('RGB') clips at 255, which saturates 16-bit images.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr8 = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def decode_rgb(data: bytes) -> Image.Image:
    """Decode encoded image bytes to a fully loaded RGB image, or raise ImageDecodeError."""
    if not data:
        raise ImageDecodeError("empty image (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_PIXELS:
            raise ImageDecodeError(
                f"image of {img.width}x{img.height} pixels is above the {MAX_PIXELS:,}-pixel "
                "decompression-bomb limit"
            )
        img.load()  # decodes now, so corrupt data fails here and not in a later stage
        if img.width < 1 or img.height < 1:
            raise ImageDecodeError(f"image has no pixels ({img.width}x{img.height})")
        return to_rgb(img)
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"cannot decode image: {e}") from None


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
