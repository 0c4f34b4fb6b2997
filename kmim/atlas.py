"""The token atlas: the PNGs a researcher looks at to judge a codebook (`kmim show CODEBOOK --plots OUT`).

- `atlas-patches.png`: for each of the most used codes (one row each), its most typical patches, the ones
  nearest to its center, as pixels: for the pixel extractor the feature is the patch (un-normalised); for a
  ViT the patch is cut from view 0 of its source image (the extract stage's input shards).
- `atlas-usage.png`: how many patches each code takes, codes sorted by use (dead codes at the end).
- `atlas-classes.png` (labelled data): the class x code matrix R̄ (each code's distribution over classes,
  codes sorted by their dominant class), with TCAS (kmim/tcas.py) in the title.

Everything is computed on the codebook's own feature sample (the first `max_rows` rows of the extract output it
was clustered from, in file order) with the codebook's assignment, so the same inputs draw the same atlas.
`atlas.json` holds the figures drawn (usage, TCAS, the rows used, the files).
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kmim import fs
from kmim.contract.codebook import Codebook
from kmim.contract.manifest import StageManifest
from kmim.contract.views import IMAGENET_MEAN, IMAGENET_STD, ViewSpec, apply_view, center_view, to_uint8_array
from kmim.errors import InputError
from kmim.pipeline.features import _open_feature_file, open_features
from kmim.tcas import tcas, usage


@dataclass(frozen=True)
class Sample:
    keys: np.ndarray  # [n] str
    labels: np.ndarray  # [n] int64, -1 when unlabelled
    patches: np.ndarray  # [n] int64, the patch index in patchify order
    features: np.ndarray  # [n, D] float32


def features_of(codebook_url: str) -> str:
    """The extract output a codebook was clustered from (its cluster manifest's inputs)."""
    manifest = StageManifest.read_if_committed(codebook_url)
    if manifest is None or manifest.stage != "cluster" or not manifest.inputs:
        raise InputError(codebook_url, "not a finished `kmim pipeline cluster` output (no manifest.json)")
    folder = fs.dirname(manifest.inputs[0]["url"])
    if not fs.exists(fs.join(folder, "manifest.json")):
        raise InputError(codebook_url, f"its features ({folder}) are gone or moved: pass --features")
    return folder


def read_sample(features_url: str, max_rows: int) -> Sample:
    """The first max_rows rows (key, label, patch, feature) of an extract output, in file order."""
    fset = open_features(features_url)
    keys, labels, patches, feats, held = [], [], [], [], 0
    for f in fset.files:
        with _open_feature_file(f.url) as (version, source):
            table = pq.read_table(source) if version == 1 else pa.ipc.open_file(source).read_all()
        table = table.slice(0, max_rows - held)
        keys.append(table.column("key").to_numpy(zero_copy_only=False))
        labels.append(table.column("label").fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64))
        patches.append(table.column("patch").to_numpy(zero_copy_only=False).astype(np.int64))
        column = table.column("feature").combine_chunks()
        feats.append(column.flatten().to_numpy(zero_copy_only=False).reshape(-1, fset.dim).astype(np.float32))
        held += table.num_rows
        if held >= max_rows:
            break
    return Sample(
        np.concatenate(keys), np.concatenate(labels), np.concatenate(patches), np.concatenate(feats)
    )


def _pixel_patch(feature: np.ndarray, patch_size: int) -> np.ndarray:
    """A pixel-extractor feature (normalised, (p, q, c) order) back to uint8 [p, p, 3]."""
    x = feature.reshape(patch_size, patch_size, 3) * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)
    return np.clip(np.round(x * 255), 0, 255).astype(np.uint8)


def _image_patches(wanted: dict[str, list[int]], shards: list[str], spec: ViewSpec, p: int) -> dict:
    """(key, patch) -> uint8 [p, p, 3], cut from view 0 of the source images (ViT extractors)."""
    from kmim.data.reader import ReadStats, ShardRef, iter_images

    grid = spec.image_size // p
    out = {}
    for url in shards:
        if len(out) == sum(len(v) for v in wanted.values()):
            break
        shard = ShardRef(name=os.path.basename(url).rsplit(".", 1)[0], url=url)
        for sample, img in iter_images(shard, ReadStats()):
            if sample.key not in wanted:
                continue
            view = to_uint8_array(apply_view(img, center_view(img.width, img.height, spec)))
            for patch in wanted[sample.key]:
                r, c = divmod(patch, grid)
                out[(sample.key, patch)] = view[r * p : (r + 1) * p, c * p : (c + 1) * p]
    return out


def _pyplot():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:  # noqa: ANN001
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def usage_png(counts: np.ndarray) -> bytes:
    """How many patches each code takes, codes sorted by use (dead codes at the end)."""
    plt = _pyplot()
    stats = usage(counts)
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.bar(np.arange(len(counts)), np.sort(counts)[::-1], width=1.0, color="#4c72b0")
    ax.set_xlabel("code (by use)")
    ax.set_ylabel("patches")
    ax.set_title(
        f"code usage: {stats['used_codes']}/{len(counts)} used, perplexity {stats['perplexity']:.1f}"
    )
    return _png(fig)


def classes_png(cooc: np.ndarray, tcas_value: float | None) -> bytes:
    """R̄ (each used code's distribution over classes) as a heat map, codes sorted by dominant class."""
    plt = _pyplot()
    used = cooc.sum(axis=1) > 0
    rbar = cooc[used] / cooc[used].sum(axis=1, keepdims=True)
    by_class = np.lexsort((-rbar.max(axis=1), rbar.argmax(axis=1)))
    classes = cooc.shape[1]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.3 * classes)))
    im = ax.imshow(rbar[by_class].T, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xlabel(f"used code (sorted by dominant class; {int(used.sum())} of {len(cooc)})")
    ax.set_ylabel("class")
    title = "n/a" if tcas_value is None else f"{tcas_value:.4f}"
    ax.set_title(f"R̄: each code's classes; TCAS {title} (lower: better aligned)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    return _png(fig)


def atlas(
    codebook_url: str,
    out: str,
    features: str | None = None,
    max_rows: int = 200_000,
    codes_shown: int = 32,
    per_code: int = 8,
) -> dict:
    """Draw the atlas PNGs of a codebook into `out`; returns what atlas.json holds."""
    plt = _pyplot()

    book = Codebook.load(codebook_url)
    features = features or features_of(codebook_url)
    sample = read_sample(features, max_rows)
    if sample.features.shape[1] != book.dim:
        raise InputError(features, f"features have dim {sample.features.shape[1]}, the codebook {book.dim}")
    d2, codes = book.assigner().assign(book.prepare(sample.features))
    counts = np.bincount(codes, minlength=book.k)
    fs.makedirs(out)
    doc: dict = {"codebook": codebook_url, "features": features, "rows": int(len(codes)), "k": book.k}
    doc["usage"] = usage(counts)
    files = {}

    # usage, codes by use; class x code R̄ and TCAS
    files["usage"] = fs.join(out, "atlas-usage.png")
    fs.write_bytes_atomic(files["usage"], usage_png(counts))
    labelled = sample.labels >= 0
    if labelled.any():
        cooc = np.zeros((book.k, int(sample.labels[labelled].max()) + 1), dtype=np.int64)
        np.add.at(cooc, (codes[labelled], sample.labels[labelled]), 1)
        doc["tcas"] = tcas(cooc)
        files["classes"] = fs.join(out, "atlas-classes.png")
        fs.write_bytes_atomic(files["classes"], classes_png(cooc, doc["tcas"]["tcas"]))

    # the most typical patches of the most used codes
    order = np.argsort(-counts, kind="stable")
    shown = [int(c) for c in order[:codes_shown] if counts[c] > 0]
    typical = {}
    for c in shown:
        rows = np.flatnonzero(codes == c)
        typical[c] = rows[np.argsort(d2[rows], kind="stable")[:per_code]]
    p = book.patch_size
    extractor = book.extractor["name"]
    if extractor == "pixel":
        pixels = {
            (c, int(r)): _pixel_patch(sample.features[r], p) for c, rows in typical.items() for r in rows
        }
    else:
        extract_manifest = StageManifest.read_if_committed(features)
        shards = [ref["url"] for ref in extract_manifest.inputs] if extract_manifest else []
        wanted: dict[str, list[int]] = defaultdict(list)
        for rows in typical.values():
            for r in rows:
                wanted[str(sample.keys[r])].append(int(sample.patches[r]))
        cut = _image_patches(wanted, shards, book.view_spec, p)
        pixels = {
            (c, int(r)): cut[(str(sample.keys[r]), int(sample.patches[r]))]
            for c, rows in typical.items()
            for r in rows
            if (str(sample.keys[r]), int(sample.patches[r])) in cut
        }
    fig, axes = plt.subplots(
        len(shown), per_code, figsize=(per_code * 0.6 + 1, len(shown) * 0.6 + 0.6), squeeze=False
    )
    for i, c in enumerate(shown):
        for j in range(per_code):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(typical[c]) and (c, int(typical[c][j])) in pixels:
                ax.imshow(pixels[(c, int(typical[c][j]))], interpolation="nearest")
            if j == 0:
                ax.set_ylabel(str(c), rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(f"most typical patches of the {len(shown)} most used codes ({extractor})", fontsize=9)
    files["patches"] = fs.join(out, "atlas-patches.png")
    fs.write_bytes_atomic(files["patches"], _png(fig))

    doc["files"] = {name: fs.basename(path) for name, path in files.items()}
    doc["codes_shown"] = shown
    fs.write_json_atomic(fs.join(out, "atlas.json"), doc)
    return doc
