"""Grid views (token format 2): tokenize renders each image at several scales (and mirrored) and tokenizes
whole patch grids; the trainer cuts a patch-aligned window from the tokens and from the same render's pixels.
Real digits, a real codebook, Ray tokenize, and the trainer's own decode path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from kmim.contract.codebook import Codebook
from kmim.contract.grid import GridSpec, Render, draw_window, make_renders
from kmim.errors import ConfigError
from kmim.pipeline.configs import TokenizeConfig
from kmim.pipeline.tokenize import decode_npy, tokenize
from kmim.tokenizer import Tokenizer
from kmim.trainer.data import TrainStream, open_train_shards

RECIPE = str(Path(__file__).resolve().parents[2] / "manifests" / "recipes" / "digits-tiny.yaml")
GRID = 8  # 32 px views, 4 px patches


def _samples(tar_path: Path) -> list[dict]:
    """The samples of one shard as webdataset groups them (key, url and members)."""
    out: dict[str, dict] = {}
    with tarfile.open(tar_path) as t:
        for m in t.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {"__key__": key, "__url__": str(tar_path)})[ext] = t.extractfile(m).read()
    return list(out.values())


def test_renders_are_view_0_then_each_scale_aspect_and_mirror():
    renders = make_renders(GridSpec((1.0, 1.5), (1.0, 0.75), flip=True), GRID)
    assert renders[0] == Render(0, 1.0, 1.0, False, 8, 8)  # view 0 itself
    assert len(renders) == 2 * 2 * 2 and [r.render for r in renders] == list(range(8))
    big = next(r for r in renders if (r.scale, r.aspect, r.flip) == (1.5, 1.0, False))
    assert (big.rows, big.cols) == (12, 12)
    wide = next(r for r in renders if (r.scale, r.aspect, r.flip) == (1.5, 0.75, False))
    assert (wide.rows, wide.cols) == (10, 14)  # a window is 8/14 wide and 8/10 tall: width/height 0.75
    assert all(r.rows >= GRID and r.cols >= GRID for r in renders)
    for bad, why in (("1.5", "include 1.0"), ("1.0,0.9", ">= 1"), ("1.0,x", "comma-separated")):
        with pytest.raises(ConfigError, match=why):
            GridSpec.parse(bad)
    with pytest.raises(ConfigError, match="views must be 1 with grid_scales"):
        TokenizeConfig(views=2, grid_scales="1.0,1.5")


def test_windows_are_a_pure_function_of_seed_epoch_and_key_and_cover_every_offset():
    renders = make_renders(GridSpec((1.0, 1.5), flip=True), GRID)
    draws = [draw_window(0, epoch, "img-7", renders, GRID) for epoch in range(400)]
    assert draws == [draw_window(0, epoch, "img-7", renders, GRID) for epoch in range(400)]
    assert draws != [draw_window(1, epoch, "img-7", renders, GRID) for epoch in range(400)]
    assert {r for r, _, _ in draws} == {0, 1, 2, 3}
    big = [(t, left) for r, t, left in draws if renders[r].rows == 12]
    assert {t for t, _ in big} == set(range(5)) and {left for _, left in big} == set(range(5))
    assert all((t, left) == (0, 0) for r, t, left in draws if renders[r].rows == GRID)


@pytest.fixture(scope="module")
def grid_tokens(digits_dir, digits_tokens, tmp_path_factory):
    out = tmp_path_factory.mktemp("grid") / "tokens"
    config = TokenizeConfig(views=1, grid_scales="1.0,1.5", grid_flip=True)
    result = tokenize(str(digits_dir), str(out), str(digits_tokens / "codebook"), config)
    return out, result


def test_grid_shards_hold_every_render_and_render_0_is_view_0(grid_tokens, digits_tokens):
    out, result = grid_tokens
    stats = result.manifest.stats
    assert stats["token_format"] == 2 and stats["renders"] == 4 and stats["samples"] == 1797
    sample = _samples(sorted(out.glob("train-*.tar"))[0])[0]
    meta = json.loads(sample["grid.json"])
    flat = decode_npy(sample["grid.npy"])
    assert meta["format"] == 2 and meta["grid"] == GRID and len(meta["renders"]) == 4
    assert flat.ndim == 1 and flat.size == 64 + 64 + 144 + 144 and flat.dtype == np.uint16
    # render 0 is view 0 of the format-1 shards made with the same codebook: same tokens, same TCAS
    old = {s["__key__"]: s for s in _samples(sorted((digits_tokens / "tokens").glob("train-*.tar"))[0])}
    np.testing.assert_array_equal(
        flat[:64].reshape(8, 8), decode_npy(old[sample["__key__"]]["tokens.npy"])[0]
    )
    grid_report = json.loads((out / "report.json").read_text())
    views_report = json.loads((digits_tokens / "tokens" / "report.json").read_text())
    assert grid_report["tcas"] == views_report["tcas"]


def test_a_windows_tokens_equal_the_tokens_recomputed_on_its_pixels(grid_tokens, digits_tokens):
    out, _ = grid_tokens
    codebook = digits_tokens / "codebook"
    tokenizer = Tokenizer.from_codebook(str(codebook))
    shards = open_train_shards(str(out / "train.shards.json"))
    stream = TrainStream(shards, 0, 1, 8, 1, 32, 0, 8, need_tokens=True, num_tokens=16, grid=GRID)
    seen = set()
    for sample in _samples(sorted(out.glob("train-*.tar"))[0])[:12]:
        for epoch in range(6):
            stream.epoch = epoch
            pixels, tokens, label = stream._decode(sample)
            assert pixels.shape == (32, 32, 3) and tokens.shape == (64,) and 0 <= label < 10
            np.testing.assert_array_equal(tokenizer(pixels[None])[0], tokens)
            seen.add(
                draw_window(0, epoch, sample["__key__"], make_renders(GridSpec((1.0, 1.5), flip=True), 8), 8)
            )
    assert len({r for r, _, _ in seen}) == 4 and any(
        t or left for _, t, left in seen
    )  # windows off the corner
    assert Codebook.load(str(codebook)).k == 16


def _train_cmd(data, out, *extra):
    return [
        sys.executable,
        "-m",
        "kmim",
        "train",
        "--config",
        RECIPE,
        "--data",
        str(data),
        "--output",
        str(out),
        "optim.epochs=3",
        "log_every=1",
        "data.samples_per_epoch=640",
        "checkpoint.every_steps=5",
        "data.loader_workers=0",
        "data.shuffle_buffer=128",
        *extra,
    ]


def _losses(run_dir: Path) -> dict[int, float]:
    last = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        last[r["step"]] = r["loss"]
    return last


@pytest.mark.slow
def test_resume_after_a_kill_with_grid_views_follows_the_uninterrupted_loss_curve(grid_tokens, tmp_path):
    data = grid_tokens[0] / "train.shards.json"
    reference = tmp_path / "ref"
    subprocess.run(_train_cmd(data, reference), check=True, capture_output=True, timeout=300)
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_cmd(data, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline and not list(out.glob("checkpoint-00000015.pt")):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in out.glob("checkpoint-*.pt"))
    assert done and done[-1] != "checkpoint-00000030.pt", done
    subprocess.run(_train_cmd(data, out, "--resume"), check=True, capture_output=True, timeout=300)
    ref, got = _losses(reference), _losses(out)
    assert sorted(got) == sorted(ref) == list(range(1, 31))
    np.testing.assert_allclose([got[s] for s in ref], [ref[s] for s in ref], rtol=1e-5)
