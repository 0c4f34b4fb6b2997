"""One patch order for the whole project: MAE's `nchpwq -> nhwpqc`.

A patch's feature vector is its pixels in (row p, column q, channel c) order, and patches are numbered
row-major over the (h, w) grid. Extraction, tokenization and the trainer's targets all use these two
functions, so patch i of a token grid is patch i of the encoder's input.
"""

from __future__ import annotations

import torch


def grid_size(image_size: int, patch_size: int) -> int:
    if image_size % patch_size:
        raise ValueError(f"image size {image_size} is not a multiple of patch size {patch_size}")
    return image_size // patch_size


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """imgs [N, C, H, W] -> patches [N, L, p*p*C], L = (H/p)*(W/p)."""
    n, c, h_px, w_px = imgs.shape
    p = patch_size
    if h_px % p or w_px % p:
        raise ValueError(f"image {h_px}x{w_px} is not divisible into {p}x{p} patches")
    h, w = h_px // p, w_px // p
    x = imgs.reshape(n, c, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, h * w, p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """patches [N, L, p*p*C] -> imgs [N, C, H, W] for a square grid of L patches."""
    n, length, dim = x.shape
    p = patch_size
    h = w = int(round(length**0.5))
    if h * w != length or dim != p * p * channels:
        raise ValueError(f"cannot unpatchify {tuple(x.shape)} with patch size {p} and {channels} channels")
    x = x.reshape(n, h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, channels, h * p, w * p)
