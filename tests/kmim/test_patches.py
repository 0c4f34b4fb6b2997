import pytest
import torch

from kmim.contract.patches import grid_size, patchify, unpatchify


def test_patchify_round_trips():
    x = torch.randn(3, 3, 32, 48)
    p = patchify(x, 8)
    assert p.shape == (3, 4 * 6, 8 * 8 * 3)
    y = unpatchify(patchify(torch.randn(2, 3, 32, 32), 4), 4)
    assert y.shape == (2, 3, 32, 32)
    z = torch.randn(2, 3, 32, 32)
    assert torch.equal(unpatchify(patchify(z, 4), 4), z)


def test_patch_order_is_mae_row_major_with_pixels_then_channels():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)  # 2 channels, 4x4, patch 2
    p = patchify(x, 2)
    # patch 1 is the top row's second patch: rows 0-1, columns 2-3; features are (p, q, c) ordered.
    expected = torch.tensor([x[0, c, r, col] for r in (0, 1) for col in (2, 3) for c in (0, 1)])
    assert torch.equal(p[0, 1], expected)
    assert p.shape == (1, 4, 8)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        patchify(torch.zeros(1, 3, 30, 30), 4)
    with pytest.raises(ValueError):
        grid_size(30, 4)
    assert grid_size(224, 16) == 14
