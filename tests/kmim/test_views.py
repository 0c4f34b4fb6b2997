import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from kmim.contract.views import (
    ViewParams,
    ViewSpec,
    apply_view,
    center_view,
    make_views,
    normalize,
    random_view,
    to_uint8_array,
)
from kmim.errors import ConfigError


def _photo(w=57, h=41, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_recorded_view_replays_bit_identical_through_json():
    img, spec = _photo(), ViewSpec(image_size=32)
    for params in make_views(img.width, img.height, spec, seed=7, key="a/b-1", num_views=6):
        first = to_uint8_array(apply_view(img, params))
        replayed = ViewParams.from_json(json.loads(json.dumps(params.to_json())))
        assert replayed == params
        assert np.array_equal(first, to_uint8_array(apply_view(img, replayed)))


def test_random_views_are_seeded_by_seed_key_and_view():
    spec = ViewSpec(image_size=16)
    a = random_view(100, 80, spec, seed=1, key="k", view=3)
    assert a == random_view(100, 80, spec, seed=1, key="k", view=3)
    others = {
        random_view(100, 80, spec, seed=s, key=k, view=v)
        for s, k, v in [(2, "k", 3), (1, "j", 3), (1, "k", 4)]
    }
    assert a not in others and len(others) == 3


def test_random_view_boxes_follow_random_resized_crop_bounds():
    spec = ViewSpec(image_size=16)
    flips = 0
    for v in range(1, 400):
        p = random_view(120, 90, spec, seed=0, key="x", view=v)
        assert 0 <= p.top and p.top + p.height <= 90 and 0 <= p.left and p.left + p.width <= 120
        area = p.height * p.width / (120 * 90)
        assert 0.2 - 0.02 <= area <= 1.0
        assert 3 / 4 - 0.05 <= p.width / p.height <= 4 / 3 + 0.05
        flips += p.flip
    assert 150 < flips < 250  # p = 0.5


def test_center_view_matches_resize_then_center_crop_geometry():
    img = _photo(96, 64, seed=3).resize((96, 64))
    spec = ViewSpec(image_size=56, crop_pct=0.875)
    ours = to_uint8_array(apply_view(img, center_view(96, 64, spec))).astype(float)
    tv = T.Compose([T.Resize(int(56 / 0.875), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(56)])
    ref = np.asarray(tv(img), dtype=float)
    # Same geometry; one resampling instead of two, so pixels differ only by interpolation noise.
    assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.5
    smooth = Image.fromarray(np.uint8(np.add.outer(np.arange(64), np.arange(96)) % 256))
    smooth = smooth.convert("RGB")
    ours = to_uint8_array(apply_view(smooth, center_view(96, 64, spec))).astype(float)
    assert np.abs(ours - np.asarray(tv(smooth), dtype=float)).mean() < 3.0


def test_images_smaller_than_the_target_are_upsampled():
    tiny = Image.new("RGB", (3, 2), (10, 200, 30))
    for p in make_views(3, 2, ViewSpec(image_size=32), seed=0, key="t", num_views=5):
        out = apply_view(tiny, p)
        assert out.size == (32, 32)
    one = Image.new("RGB", (1, 1), (1, 2, 3))
    assert apply_view(one, random_view(1, 1, ViewSpec(image_size=8), 0, "o", 1)).size == (8, 8)


def test_normalize_is_imagenet_normalization_channels_first():
    x = torch.full((2, 4, 4, 3), 255, dtype=torch.uint8)
    y = normalize(x)
    assert y.shape == (2, 3, 4, 4)
    assert torch.allclose(
        y[0, :, 0, 0], (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    )


@pytest.mark.parametrize(
    "bad", [dict(image_size=0), dict(crop_pct=1.5), dict(scale=(0.5, 0.2)), dict(ratio=(0, 1)), dict(hflip=2)]
)
def test_view_spec_validates_on_construction(bad):
    with pytest.raises(ConfigError):
        ViewSpec(**bad)
