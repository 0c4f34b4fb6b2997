"""`kmim pipeline tokenize` and TCAS on a real local Ray: tokens equal a direct recompute."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from typer.testing import CliRunner

from kmim.cli import app
from kmim.contract.images import decode_rgb
from kmim.contract.patches import patchify
from kmim.contract.views import ViewParams, apply_view, normalize, to_uint8_array
from kmim.data.tar import write_tar_shard
from kmim.errors import InputError
from kmim.pipeline.cluster import ClusterConfig, cluster
from kmim.pipeline.extract import ExtractConfig, extract
from kmim.pipeline.tokenize import TokenizeConfig, decode_npy, tcas_report, tokenize
from kmim.tcas import tcas
from kmim.tokenizer import load_codebook

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def digits_codebook(digits_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("digits_codebook")
    extract(
        str(digits_dir / "train.shards.json"),
        str(root / "features"),
        ExtractConfig(image_size=32, patch_size=8, patches_per_image=8, dtype="float32"),
    )
    cluster(str(root / "features"), str(root / "codebook"), ClusterConfig(k=16, epochs=3))
    return root / "codebook"


def _members(tar_path):
    out = {}
    with tarfile.open(tar_path) as t:
        for m in t.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = t.extractfile(m).read()
    return out


def test_tokens_equal_a_direct_recompute_for_every_sample(digits_dir, digits_codebook, tmp_path):
    out = tmp_path / "tokens"
    result = tokenize(
        str(digits_dir / "val-000001.tar"), str(out), str(digits_codebook), TokenizeConfig(views=3, seed=4)
    )
    assert result.ran and result.manifest.stats["samples"] == 103
    centers, meta = load_codebook(str(digits_codebook))
    source = _members(digits_dir / "val-000001.tar")
    written = _members(out / "val-000001.tar")
    assert list(written) == list(source)  # same keys, same order
    for key, members in written.items():
        assert members["png"] == source[key]["png"]  # image bytes passed through unchanged
        assert members["cls"] == source[key]["cls"]
        tokens = decode_npy(members["tokens.npy"])
        assert tokens.dtype == np.uint16 and tokens.shape == (3, 4, 4)
        views = json.loads(members["views.json"])["views"]
        img = decode_rgb(members["png"])
        for v in (0, 2):
            params = ViewParams.from_json(views[v])
            assert params.view == v
            pixels = to_uint8_array(apply_view(img, params))
            feats = patchify(normalize(torch.from_numpy(pixels.copy())), 8)[0].numpy()  # [16, 192]
            nearest = ((feats[:, None, :] - centers[None]) ** 2).sum(-1).argmin(1)
            assert np.array_equal(tokens[v].ravel(), nearest), (key, v)
    assert views[0]["top"] != views[2]["top"] or views[0]["width"] != views[2]["width"]  # a random view


def test_shards_index_manifest_and_report(digits_dir, digits_codebook, tmp_path):
    out = tmp_path / "tokens"
    m = tokenize(str(digits_dir), str(out), str(digits_codebook), TokenizeConfig(views=2)).manifest
    index = json.loads((out / "shards.json").read_text())
    assert index["total_samples"] == 1797 and {s["split"] for s in index["shards"]} == {"train", "val"}
    assert json.loads((out / "val.shards.json").read_text())["total_samples"] == 359
    assert (
        m.config["k"] == 16
        and m.config["views"] == 2
        and m.config["patch_size"] == 8
        and m.config["image_size"] == 32
    )
    assert (
        m.config["codebook_fingerprint"]
        == json.loads((digits_codebook / "manifest.json").read_text())["fingerprint"]
    )
    report = json.loads((out / "report.json").read_text())
    cooc = np.load(out / "tcas_R.npy", allow_pickle=False)
    assert cooc.shape == (16, 10) and cooc.sum() == 1797 * 16  # view 0: every patch of every labelled image
    assert report["tcas"]["tcas"] == pytest.approx(tcas(cooc)["tcas"]) and 0 < report["tcas"]["tcas"] < 1
    assert report["usage"]["used_codes"] + report["usage"]["dead_codes"] == 16
    seen = [
        (s["__key__"], s["tokens.npy"].shape)
        for s in wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False).decode()
    ]
    assert len(seen) == 256 and seen[0][1] == (2, 4, 4)
    # eval tcas: the same report for the same codebook, no shards written
    cli = CliRunner().invoke(
        app,
        [
            "eval",
            "tcas",
            str(digits_dir),
            "--codebook",
            str(digits_codebook),
            "--output",
            str(tmp_path / "t.json"),
        ],
    )
    assert cli.exit_code == 0, cli.output
    assert json.loads((tmp_path / "t.json").read_text())["tcas"]["tcas"] == pytest.approx(
        report["tcas"]["tcas"]
    )
    assert not list(tmp_path.glob("t.json.*"))


def test_tcas_of_hand_built_matrices():
    assert tcas(np.eye(5) * 7)["tcas"] == 0.0
    for classes, codes in [(10, 50), (3, 4)]:
        uniform = tcas(np.ones((codes, classes)))
        expected = (1 - 1 / classes) ** 2 + (1 - 1 / codes) / classes**2
        assert uniform["tcas"] == pytest.approx(expected) and uniform["l1"] == codes
    r = np.array([[3, 1], [0, 0], [2, 2]])  # the unused code is dropped: l1 = 2
    got = tcas(r)
    rbar = np.array([[0.75, 0.25], [0.5, 0.5]])
    c = rbar @ rbar.T
    assert got["l1"] == 2 and got["k"] == 3
    assert got["tcas"] == pytest.approx(((1 - np.diag(c)) ** 2).sum() / 2 + 2 * c[0, 1] ** 2 / 4)
    # codes of 4 and 4 patches: patch-weighted, each (1 - C_ii)^2 counts half
    assert got["patch_weighted_first_term"] == pytest.approx(((1 - np.diag(c)) ** 2).sum() / 2)
    skewed = tcas(np.array([[90, 90], [10, 0]]))  # one big mixed code, one small pure one
    assert skewed["first_term"] == pytest.approx((0.5**2 + 0) / 2)
    assert skewed["patch_weighted_first_term"] == pytest.approx(0.5**2 * 180 / 190)
    norm_form = tcas(r, form="norm")["first_term"]
    assert norm_form == pytest.approx(((1 - np.sqrt(np.diag(c))) ** 2).sum() / 2)
    big = np.random.default_rng(0).integers(0, 5, size=(16384, 100))  # no l1 x l1 matrix is formed
    assert 0 <= tcas(big)["tcas"] < 1


def test_codebook_extractor_mismatch_is_refused(synthetic_dir, tmp_path):
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.manual_seed(1)
    other = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "other.safetensors"))
    data = str(synthetic_dir / "train-000000.tar")
    extract(
        data,
        str(tmp_path / "f"),
        ExtractConfig(
            extractor="timm:test_vit", weights=str(tmp_path / "w.safetensors"), image_size=32, patch_size=16
        ),
    )
    cluster(str(tmp_path / "f"), str(tmp_path / "cb"), ClusterConfig(k=4, epochs=2))
    with pytest.raises(InputError, match="is not the weights file this codebook was built with"):
        tokenize(
            data,
            str(tmp_path / "t1"),
            str(tmp_path / "cb"),
            TokenizeConfig(weights=str(tmp_path / "other.safetensors")),
        )
    os.rename(tmp_path / "w.safetensors", tmp_path / "moved.safetensors")
    with pytest.raises(InputError, match="pass the same file with --weights"):
        tokenize(data, str(tmp_path / "t2"), str(tmp_path / "cb"))
    m = tokenize(
        data,
        str(tmp_path / "t3"),
        str(tmp_path / "cb"),
        TokenizeConfig(weights=str(tmp_path / "moved.safetensors")),
    ).manifest
    assert m.stats["samples"] == 15
    with pytest.raises(InputError, match="not a finished `kmim pipeline cluster` output"):
        tokenize(data, str(tmp_path / "t4"), str(tmp_path / "f"))


def test_corrupt_inputs_are_counted_and_unlabelled_data_has_no_tcas(digits_codebook, tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (120, 30, 200)).save(buf, format="PNG")
    with write_tar_shard(str(tmp_path / "in" / "x-000000.tar")) as sink:
        sink.write("good", {"png": buf.getvalue()})
        sink.write("bad", {"png": b"\x89PNG broken"})
    m = tokenize(str(tmp_path / "in"), str(tmp_path / "t"), str(digits_codebook)).manifest
    assert m.stats["samples"] == 1 and m.stats["num_skipped"] == 1 and m.stats["skipped"][0]["key"] == "bad"
    assert m.stats["tcas"] is None
    with pytest.raises(InputError, match="has no labels"):
        tcas_report(str(tmp_path / "in"), str(digits_codebook))
