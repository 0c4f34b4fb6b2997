"""Grid views: augmentation that pre-tokenized shards can afford (token shard format 2).

Instead of V stored crops, tokenize renders each image once per (scale, aspect[, mirror]) and tokenizes the
render's whole patch grid. A render is view 0's box (the Resize + CenterCrop geometry) resized to
`cols * p` x `rows * p` pixels (bicubic), mirrored if flagged, with

    rows = max(G, round(G * scale * sqrt(aspect)))      cols = max(G, round(G * scale / sqrt(aspect)))

for the model's grid of G x G patches of p pixels. At train time each sample draws, from a stream seeded by
(seed, epoch, key), a render and a patch-aligned window of G x G patches in it, and the trainer crops the same
window from the same render's pixels. That is RandomResizedCrop restricted to the patch lattice: the window
covers 1 / scale^2 of view 0's box, with width/height `aspect` (torchvision's `ratio`), mirrored or not.

For per-patch extractors (pixel) a window's tokens equal the tokens of the window's pixels recomputed (tested).
For ViT extractors they are the tokens of those patches seen in the context of the whole render.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from kmim.contract import streams
from kmim.contract.views import ViewParams, key_hash
from kmim.errors import ConfigError

GRID_FORMAT_VERSION = 2  # token shards: 1 = tokens.npy + views.json (stored views), 2 adds grid views


def parse_floats(text: str, name: str) -> tuple[float, ...]:
    """'1.0,1.25,1.5' -> (1.0, 1.25, 1.5); a clear error naming the option otherwise."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{name} must be comma-separated finite numbers, got {text!r}")
    return values


@dataclass(frozen=True)
class GridSpec:
    """The renders of every image. 1.0 must be among the scales and the aspects: render 0, the unmirrored
    (1.0, 1.0) render, is view 0 itself (the TCAS report and evaluation geometry)."""

    scales: tuple[float, ...]
    aspects: tuple[float, ...] = (1.0,)
    flip: bool = False

    def __post_init__(self) -> None:
        if 1.0 not in self.scales or any(s < 1.0 for s in self.scales):
            raise ConfigError(f"grid scales must be >= 1 and include 1.0 (view 0), got {list(self.scales)}")
        if 1.0 not in self.aspects or any(not 0.25 <= a <= 4.0 for a in self.aspects):
            raise ConfigError(f"grid aspects must be in [0.25, 4] and include 1.0, got {list(self.aspects)}")
        if len(set(self.scales)) != len(self.scales) or len(set(self.aspects)) != len(self.aspects):
            raise ConfigError(
                f"grid scales and aspects must not repeat: {list(self.scales)}, {list(self.aspects)}"
            )

    @classmethod
    def parse(cls, scales: str, aspects: str = "1.0", flip: bool = False) -> GridSpec:
        return cls(parse_floats(scales, "grid_scales"), parse_floats(aspects, "grid_aspects"), flip)


@dataclass(frozen=True)
class Render:
    """One rendering of a sample: `rows` x `cols` patches of view 0's box at (scale, aspect), mirrored or not."""

    render: int
    scale: float
    aspect: float
    flip: bool
    rows: int
    cols: int

    @property
    def patches(self) -> int:
        return self.rows * self.cols

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Render:
        return cls(
            int(d["render"]),
            float(d["scale"]),
            float(d["aspect"]),
            bool(d["flip"]),
            int(d["rows"]),
            int(d["cols"]),
        )


def make_renders(spec: GridSpec, grid: int) -> list[Render]:
    """Render 0 = (1.0, 1.0, not mirrored) = view 0; then every (scale, aspect, mirror) in the spec's order."""
    combos = [(1.0, 1.0, False)] + [
        (s, a, f)
        for s in spec.scales
        for a in spec.aspects
        for f in ((False, True) if spec.flip else (False,))
        if (s, a, f) != (1.0, 1.0, False)
    ]
    renders = []
    for i, (scale, aspect, flip) in enumerate(combos):
        rows = max(grid, int(round(grid * scale * math.sqrt(aspect))))
        cols = max(grid, int(round(grid * scale / math.sqrt(aspect))))
        renders.append(Render(i, scale, aspect, flip, rows, cols))
    return renders


def render_image(img: Image.Image, box: ViewParams, render: Render, patch_size: int) -> Image.Image:
    """view 0's box resized to cols*p x rows*p (bicubic), mirrored if flagged: the pixels render's tokens see."""
    crop = (box.left, box.top, box.left + box.width, box.top + box.height)
    size = (render.cols * patch_size, render.rows * patch_size)
    out = img.resize(size, resample=Image.Resampling.BICUBIC, box=crop)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if render.flip else out


def draw_window(seed: int, epoch: int, key: str, renders: list[Render], grid: int) -> tuple[int, int, int]:
    """(render, top, left) of the G x G window a sample trains on in `epoch`: a pure function of
    (seed, epoch, key), so a resumed run draws the same windows."""
    rng = streams.rng("grid_window", seed, epoch, key_hash(key))
    r = renders[int(rng.integers(len(renders)))]
    return r.render, int(rng.integers(r.rows - grid + 1)), int(rng.integers(r.cols - grid + 1))


def split_tokens(flat: np.ndarray, renders: list[Render]) -> list[np.ndarray]:
    """grid.npy (every render's [rows, cols] ids, concatenated row-major) -> one array per render."""
    out, start = [], 0
    for r in renders:
        out.append(flat[start : start + r.patches].reshape(r.rows, r.cols))
        start += r.patches
    return out


def check_grid(flat: np.ndarray, meta: object, num_tokens: int | None, grid: int | None) -> str | None:
    """Why a sample's grid.npy / grid.json cannot be trained on (None: they can)."""
    if not isinstance(meta, dict) or not isinstance(meta.get("renders"), list) or not meta["renders"]:
        return "grid.json lists no renders"
    try:
        renders = [Render.from_json(r) for r in meta["renders"]]
        ViewParams.from_json(meta["box"])
    except (KeyError, TypeError, ValueError) as e:
        return f"grid.json is malformed ({type(e).__name__}: {e})"
    if grid is not None and int(meta.get("grid", -1)) != grid:
        return f"grid.json is for a {meta.get('grid')}-patch grid, the model's is {grid}"
    g = int(meta.get("grid", 0))
    if any(r.rows < g or r.cols < g for r in renders):
        return f"a render is smaller than the {g}x{g} window"
    if flat.dtype.kind not in "ui" or flat.ndim != 1:
        return f"grid.npy holds {flat.dtype} of shape {list(flat.shape)}, not a flat array of token ids"
    if flat.size != sum(r.patches for r in renders):
        return f"grid.npy has {flat.size} ids, the renders {sum(r.patches for r in renders)}"
    if flat.size and (int(flat.min()) < 0 or (num_tokens is not None and int(flat.max()) >= num_tokens)):
        return (
            f"token ids span [{int(flat.min())}, {int(flat.max())}], outside the codebook's [0, {num_tokens})"
        )
    return None
