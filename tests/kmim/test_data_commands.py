"""`kmim data digits|synthetic|shard` through the real CLI."""

import hashlib
import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import webdataset as wds
from PIL import Image
from typer.testing import CliRunner

from kmim.cli import app
from kmim.data.reader import ReadStats, iter_images, open_dataset

runner = CliRunner()


def _invoke(*args):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_digits_writes_1797_real_samples_readable_by_webdataset_and_tar(tmp_path):
    out = tmp_path / "d"
    proc = subprocess.run(
        [sys.executable, "-m", "kmim", "data", "digits", str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote 1797 samples" in proc.stdout
    index = json.loads((out / "shards.json").read_text())
    assert index["total_samples"] == 1797
    train = sorted(out.glob("train-*.tar"))
    val = sorted(out.glob("val-*.tar"))
    seen = [
        (s["__key__"], s["cls"], s["png"])
        for s in wds.WebDataset([str(p) for p in train + val], shardshuffle=False).decode("pil")
    ]
    assert len(seen) == 1797 and len({k for k, _, _ in seen}) == 1797
    assert {c for _, c, _ in seen} == set(range(10))
    assert all(img.mode == "RGB" and img.size == (32, 32) for _, _, img in seen)
    listing = subprocess.run(
        ["tar", "-tf", str(train[0])], capture_output=True, text=True, check=True
    ).stdout.split()
    assert listing[:2] == ["digits-0000.png", "digits-0000.cls"]
    for entry in index["shards"]:
        assert (
            _sha(out / entry["url"]) == entry["sha256"]
            and (out / entry["url"]).stat().st_size == entry["bytes"]
        )
    n_val = sum(e["samples"] for e in index["shards"] if e["split"] == "val")
    assert n_val == 359  # 20 % of each class, rounded per class
    assert json.loads((out / "config.json").read_text())["image_size"] == 32


def test_digits_is_deterministic_and_the_seed_changes_the_split(tmp_path):
    _invoke("data", "digits", str(tmp_path / "a"), "--image-size", "16")
    _invoke("data", "digits", str(tmp_path / "b"), "--image-size", "16")
    _invoke("data", "digits", str(tmp_path / "c"), "--image-size", "16", "--seed", "1")
    assert _sha(tmp_path / "a" / "train-000000.tar") == _sha(tmp_path / "b" / "train-000000.tar")
    assert _sha(tmp_path / "a" / "train-000000.tar") != _sha(tmp_path / "c" / "train-000000.tar")


def test_synthetic_is_deterministic_with_class_structure(tmp_path):
    args = ["--num-images", "60", "--image-size", "24", "--classes", "3", "--shard-size", "25"]
    _invoke("data", "synthetic", str(tmp_path / "a"), *args)
    _invoke("data", "synthetic", str(tmp_path / "b"), *args)
    shards = sorted((tmp_path / "a").glob("train-*.tar"))
    assert len(shards) == 3
    assert [_sha(p) for p in shards] == [_sha(tmp_path / "b" / p.name) for p in shards]
    stats = ReadStats()
    by_class = {}
    for shard in open_dataset(str(tmp_path / "a")).shards:
        for sample, img in iter_images(shard, stats):
            by_class.setdefault(sample.label, []).append(np.asarray(img, dtype=float))
    assert sorted(by_class) == [0, 1, 2] and stats.samples == 60
    # Images of one class are closer to each other than to other classes (not noise).
    means = {c: np.mean(v, axis=0) for c, v in by_class.items()}
    within = np.mean([np.abs(x - means[c]).mean() for c, v in by_class.items() for x in v])
    between = np.mean([np.abs(means[a] - means[b]).mean() for a in means for b in means if a < b])
    assert within < 80 and between > 10


def test_shard_packs_a_class_folder_with_passthrough_bytes_and_lists_corrupt_files(tmp_path):
    src = tmp_path / "src"
    originals = {}
    for c, cls in enumerate(["n01", "n02"]):
        (src / cls).mkdir(parents=True)
        for i in range(4):
            buf = io.BytesIO()
            Image.new("RGB", (20 + i, 10), (60 * c, 30 * i, 5)).save(buf, format="JPEG")
            (src / cls / f"{cls}_{i}.JPEG").write_bytes(buf.getvalue())
            originals[f"{cls}/{cls}_{i}"] = buf.getvalue()
    (src / "n02" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    output = _invoke("data", "shard", str(src), str(tmp_path / "out"), "--shard-size", "3")
    assert "wrote 8 samples" in output and "skipped 1" in output
    out = tmp_path / "out"
    assert json.loads((out / "classes.json").read_text())["classes"] == ["n01", "n02"]
    stats = json.loads((out / "_stats.json").read_text())
    assert stats["num_skipped"] == 1 and stats["skipped"][0]["key"] == "n02/broken"
    got = {}
    for tar in sorted(out.glob("train-*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                got[m.name] = t.extractfile(m).read()
    for key, data in originals.items():
        assert got[f"{key}.jpg"] == data  # bytes unchanged
    assert got["n02/n02_3.cls"] == b"1"


def test_bad_options_give_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "kmim", "data", "digits", str(tmp_path), "--val-fraction", "1.5"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "val_fraction must be in [0, 1)" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "kmim", "data", "shard", str(tmp_path / "missing"), str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "missing: no such file or directory" in proc.stderr


def test_version_and_help():
    assert _invoke("--version").startswith("kmim 0.1")
    for group in ([], ["data"], ["data", "digits"], ["data", "synthetic"], ["data", "shard"]):
        assert "Usage" in _invoke(*group, "--help")
