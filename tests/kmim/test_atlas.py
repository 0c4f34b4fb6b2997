"""The token atlas: `kmim show CODEBOOK --plots OUT` draws the typical patches of each code, code usage and
the class x code matrix with TCAS; the tokenize stage draws usage and R̄ of its own tokens; compare links them."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from kmim.cli import app
from kmim.pipeline.features import iter_feature_batches, open_features
from kmim.tcas import tcas


def _size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.load()  # a whole, decodable PNG
        return im.size


def test_show_plots_draws_the_atlas_of_a_codebook(digits_tokens, tmp_path):
    codebook, out = digits_tokens / "codebook", tmp_path / "atlas"
    result = CliRunner().invoke(app, ["show", str(codebook), "--plots", str(out)])
    assert result.exit_code == 0, result.output
    assert "atlas: atlas-usage.png, atlas-classes.png, atlas-patches.png" in result.output
    doc = json.loads((out / "atlas.json").read_text())
    assert doc["k"] == 16 and doc["usage"]["used_codes"] <= 16 and doc["features"].endswith("features")
    fset = open_features(doc["features"])
    assert (
        doc["rows"] == fset.rows == sum(len(b) for f in fset.files for b in iter_feature_batches(f.url, 48))
    )
    assert 0 < doc["tcas"]["tcas"] < 1 and doc["tcas"]["classes"] == 10
    width, height = _size(out / "atlas-usage.png")
    assert width >= 600 and 250 <= height <= 400
    width, height = _size(out / "atlas-classes.png")
    assert width >= 600 and height >= 250
    shown = len(doc["codes_shown"])
    assert shown == doc["usage"]["used_codes"]  # fewer than 32 codes: every used code has its row
    width, height = _size(out / "atlas-patches.png")
    assert width >= 8 * 40 and height >= shown * 50  # one row of 8 patches per code


def test_the_atlas_tcas_is_the_tcas_of_its_counts(digits_tokens, tmp_path):
    from kmim.atlas import atlas, read_sample
    from kmim.contract.codebook import Codebook

    doc = atlas(
        str(digits_tokens / "codebook"), str(tmp_path / "a"), max_rows=5000, codes_shown=4, per_code=3
    )
    sample = read_sample(str(digits_tokens / "features"), 5000)
    codes = Codebook.load(str(digits_tokens / "codebook")).assign(sample.features)
    cooc = np.zeros((16, 10), dtype=np.int64)
    np.add.at(cooc, (codes, sample.labels), 1)
    assert doc["rows"] == 5000 and doc["tcas"]["tcas"] == tcas(cooc)["tcas"]
    assert len(doc["codes_shown"]) == 4 and _size(tmp_path / "a" / "atlas-patches.png")[0] >= 3 * 40


def test_tokenize_draws_usage_and_classes_of_its_tokens(digits_tokens):
    tokens = digits_tokens / "tokens"
    report = json.loads((tokens / "report.json").read_text())
    assert report["tcas"] and _size(tokens / "atlas-usage.png")[0] >= 600
    assert _size(tokens / "atlas-classes.png")[1] >= 250
