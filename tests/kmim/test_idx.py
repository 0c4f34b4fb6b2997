"""IDX files (MNIST-style) as labelled shards: `write_idx`, `write_fashion_mnist` and their CLI commands.

Every test writes its own small IDX files by hand; the last one reads the real Fashion-MNIST files from
Debian's package `dataset-fashion-mnist` when they are installed.
"""

import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from typer.testing import CliRunner

from kmim.cli import app
from kmim.data.idx import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    FASHION_MNIST_SOURCE,
    FashionMnistConfig,
    IdxConfig,
    fashion_mnist_files,
    read_idx,
    read_idx_pair,
    write_fashion_mnist,
    write_idx,
)
from kmim.data.reader import ReadStats, iter_samples, open_dataset
from kmim.errors import InputError

runner = CliRunner()


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """The IDX encoding of a uint8 array: 0, 0, type, ndim; big-endian uint32 dims; the values in C order."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, type_code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.tobytes()


def write_idx_file(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def make_pair(folder: Path, n: int = 25, side: int = 28, seed: int = 0, gz: bool = False, stem: str = "x"):
    """(images path, labels path, images, labels): random pixels, labels cycling through 0..9."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, side, side), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    suffix = ".gz" if gz else ""
    folder.mkdir(parents=True, exist_ok=True)
    img = write_idx_file(folder / f"{stem}-images-idx3-ubyte{suffix}", images, gz)
    lab = write_idx_file(folder / f"{stem}-labels-idx1-ubyte{suffix}", labels, gz)
    return img, lab, images, labels


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tars(out: Path) -> list[Path]:
    return sorted(out.glob("*.tar"))


def _wds_samples(out: Path, split: str = "train") -> list[dict]:
    urls = [str(p) for p in sorted(out.glob(f"{split}-*.tar"))]
    return list(wds.WebDataset(urls, shardshuffle=False))


def _assert_nothing_written(out: Path) -> None:
    assert not (out / "shards.json").exists()
    assert _tars(out) == []


# --- 1. a small pair, end to end -----------------------------------------------------------------------


def test_small_pair_readable_by_webdataset_with_exact_pixels_and_labels(tmp_path):
    img, lab, images, labels = make_pair(tmp_path / "src")
    out = tmp_path / "native"
    result = write_idx(str(img), str(lab), str(out), IdxConfig(split="train", image_size=0, shard_size=10))
    assert result.samples("train") == 25 and len(result.entries) == 3
    for name in ("shards.json", "train.shards.json", "_stats.json", "config.json"):
        assert (out / name).is_file(), name
    assert [p.name for p in _tars(out)] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    index = json.loads((out / "shards.json").read_text())
    assert index["total_samples"] == 25
    assert [e["samples"] for e in index["shards"]] == [10, 10, 5]
    assert json.loads((out / "train.shards.json").read_text())["total_samples"] == 25
    assert json.loads((out / "_stats.json").read_text())["samples_per_split"] == {"train": 25}
    config = json.loads((out / "config.json").read_text())
    assert config["image_size"] == 0 and config["split"] == "train" and config["shard_size"] == 10

    samples = _wds_samples(out)
    assert len(samples) == 25
    assert [s["__key__"] for s in samples] == [f"train-{i:06d}" for i in range(25)]
    for i, s in enumerate(samples):
        assert {"png", "cls"} <= set(s)
        assert int(s["cls"]) == labels[i]
        png = Image.open(io.BytesIO(s["png"]))
        assert png.format == "PNG" and png.mode == "L" and png.size == (28, 28)
        np.testing.assert_array_equal(np.asarray(png), images[i])

    resized = tmp_path / "resized"
    write_idx(str(img), str(lab), str(resized), IdxConfig(split="train", image_size=32, shard_size=10))
    samples32 = _wds_samples(resized)
    assert len(samples32) == 25
    assert [int(s["cls"]) for s in samples32] == labels.tolist()
    assert all(Image.open(io.BytesIO(s["png"])).size == (32, 32) for s in samples32)


def test_gzip_and_raw_inputs_give_identical_deterministic_shards(tmp_path):
    raw_img, raw_lab, _, _ = make_pair(tmp_path / "raw", gz=False)
    gz_img, gz_lab, _, _ = make_pair(tmp_path / "gz", gz=True)
    assert gz_img.read_bytes()[:2] == b"\x1f\x8b" and raw_img.read_bytes()[:4] == b"\x00\x00\x08\x03"
    config = IdxConfig(split="train", image_size=32, shard_size=10)
    write_idx(str(raw_img), str(raw_lab), str(tmp_path / "a"), config)
    write_idx(str(raw_img), str(raw_lab), str(tmp_path / "b"), config)
    write_idx(str(gz_img), str(gz_lab), str(tmp_path / "c"), config)
    names = [p.name for p in _tars(tmp_path / "a")]
    assert len(names) == 3
    for folder in ("b", "c"):
        assert [p.name for p in _tars(tmp_path / folder)] == names
    for name in names:
        sha = _sha(tmp_path / "a" / name)
        assert _sha(tmp_path / "b" / name) == sha  # determinism
        assert _sha(tmp_path / "c" / name) == sha  # gzip recognised and decoded to the same data
    # gzip is recognised by its magic, not by the file name
    renamed = tmp_path / "gz" / "images-without-suffix"
    renamed.write_bytes(gz_img.read_bytes())
    np.testing.assert_array_equal(read_idx(str(renamed), 3), read_idx(str(raw_img), 3))


# --- 2. two splits into one folder ---------------------------------------------------------------------


def test_train_then_val_into_one_folder_keeps_both_splits_in_the_index(tmp_path):
    train_img, train_lab, _, train_labels = make_pair(tmp_path / "src", n=25, seed=1, stem="train")
    val_img, val_lab, val_images, val_labels = make_pair(tmp_path / "src", n=12, seed=2, stem="val")
    out = tmp_path / "out"
    write_idx(str(train_img), str(train_lab), str(out), IdxConfig(split="train", shard_size=10))
    write_idx(str(val_img), str(val_lab), str(out), IdxConfig(split="val", shard_size=10))

    index = json.loads((out / "shards.json").read_text())
    assert index["total_samples"] == 37
    assert [(e["url"], e["split"], e["samples"]) for e in index["shards"]] == [
        ("train-000000.tar", "train", 10),
        ("train-000001.tar", "train", 10),
        ("train-000002.tar", "train", 5),
        ("val-000000.tar", "val", 10),
        ("val-000001.tar", "val", 2),
    ]
    assert json.loads((out / "train.shards.json").read_text())["total_samples"] == 25
    assert json.loads((out / "val.shards.json").read_text())["total_samples"] == 12

    assert open_dataset(str(out)).num_samples == 37
    assert open_dataset(str(out), split="train").num_samples == 25
    val = open_dataset(str(out / "val.shards.json"))
    assert val.num_samples == 12 and {s.split for s in val.shards} == {"val"}
    stats = ReadStats()
    got = [sample for shard in val.shards for sample in iter_samples(shard, stats, require_label=True)]
    assert stats.num_skipped == 0 and stats.samples == 12
    assert [s.key for s in got] == [f"val-{i:06d}" for i in range(12)]
    assert [s.label for s in got] == val_labels.tolist()
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(got[3].image))), val_images[3])
    train = open_dataset(str(out / "train.shards.json"))
    train_got = [s.label for shard in train.shards for s in iter_samples(shard, ReadStats())]
    assert train_got == train_labels.tolist()

    # Writing `train` again replaces train's entries and keeps val's.
    write_idx(str(train_img), str(train_lab), str(out), IdxConfig(split="train", shard_size=25))
    index = json.loads((out / "shards.json").read_text())
    assert sorted((e["url"], e["samples"]) for e in index["shards"]) == [
        ("train-000000.tar", 25),
        ("val-000000.tar", 10),
        ("val-000001.tar", 2),
    ]
    assert open_dataset(str(out)).num_samples == 37
    assert open_dataset(str(out / "val.shards.json")).num_samples == 12


# --- 3. bad inputs: one clear error naming the file, and nothing written --------------------------------


def _bad_pair(tmp_path: Path, case: str) -> tuple[str, str, Path, str]:
    """(images url, labels url, the file the error must name, a regex of the reason)."""
    img, lab, images, labels = make_pair(tmp_path / "src", n=12)
    if case == "magic":
        img.write_bytes(b"\x12\x34\x08\x03" + img.read_bytes()[4:])
        return str(img), str(lab), img, r"not an IDX file: magic number 12340803"
    if case == "empty":
        img.write_bytes(b"")
        return str(img), str(lab), img, r"not an IDX file: magic number missing"
    if case == "value-type":
        lab.write_bytes(idx_bytes(labels, type_code=0x0D))  # 0x0D: float
        return str(img), str(lab), lab, r"IDX value type 0x0d, expected 0x08"
    if case == "labels-as-images":
        return str(lab), str(img), lab, r"has 1 dimensions, expected 3"
    if case == "images-as-labels":
        return str(img), str(img), img, r"has 3 dimensions, expected 1"
    if case == "count-mismatch":
        write_idx_file(lab, labels[:11])
        return str(img), str(lab), lab, r"holds 11 labels but .* holds 12 images"
    if case == "truncated":
        img.write_bytes(img.read_bytes()[:-5])
        return str(img), str(lab), img, r"truncated: \d+ bytes, the header \[12, 28, 28\] says \d+"
    if case == "truncated-header":
        img.write_bytes(img.read_bytes()[:10])
        return str(img), str(lab), img, r"truncated: 10 bytes, shorter than its 16-byte header"
    if case == "trailing":
        lab.write_bytes(lab.read_bytes() + b"\x00\x01")
        return str(img), str(lab), lab, r"has trailing bytes: 22 bytes, the header \[12\] says 20"
    if case == "truncated-gzip":
        gz = tmp_path / "src" / "gz-images-idx3-ubyte.gz"
        gz.write_bytes(gzip.compress(idx_bytes(images), mtime=0)[:-12])
        return str(gz), str(lab), gz, r"corrupt or truncated gzip"
    if case == "corrupt-gzip":
        gz = tmp_path / "src" / "gz-labels-idx1-ubyte.gz"
        data = bytearray(gzip.compress(idx_bytes(labels), mtime=0))
        data[-8:-4] = bytes(b ^ 0xFF for b in data[-8:-4])  # the CRC32 of the trailer
        gz.write_bytes(bytes(data))
        return str(img), str(gz), gz, r"corrupt or truncated gzip"
    if case == "no-images":
        write_idx_file(img, images[:0])
        write_idx_file(lab, labels[:0])
        return str(img), str(lab), img, r"holds no images"
    if case == "missing":
        gone = tmp_path / "src" / "nowhere-labels-idx1-ubyte.gz"
        return str(img), str(gone), gone, r"no such file"
    raise AssertionError(case)


BAD_CASES = [
    "magic",
    "empty",
    "value-type",
    "labels-as-images",
    "images-as-labels",
    "count-mismatch",
    "truncated",
    "truncated-header",
    "trailing",
    "truncated-gzip",
    "corrupt-gzip",
    "no-images",
    "missing",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_raises_input_error_naming_the_file_before_writing(tmp_path, case):
    images_url, labels_url, culprit, reason = _bad_pair(tmp_path, case)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=re.escape(str(culprit)) + ": " + reason) as info:
        write_idx(images_url, labels_url, str(out), IdxConfig(shard_size=5))
    assert info.value.where == str(culprit)
    assert "\n" not in str(info.value)
    _assert_nothing_written(out)


def test_bad_input_does_not_touch_an_existing_dataset(tmp_path):
    img, lab, _, _ = make_pair(tmp_path / "good", n=12)
    out = tmp_path / "out"
    write_idx(str(img), str(lab), str(out), IdxConfig(split="train", shard_size=5))
    before = {p.name: _sha(p) for p in out.iterdir()}
    bad_img, bad_lab, culprit, reason = _bad_pair(tmp_path / "bad", "truncated")
    with pytest.raises(InputError, match=re.escape(str(culprit)) + ": " + reason):
        write_idx(bad_img, bad_lab, str(out), IdxConfig(split="val", shard_size=5))
    assert {p.name: _sha(p) for p in out.iterdir()} == before


# --- 4. write_fashion_mnist on a fake source folder ----------------------------------------------------


def make_fake_fashion(
    src: Path, n_train: int = 30, n_val: int = 10
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    src.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    arrays = {}
    for split, n in (("train", n_train), ("val", n_val)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = ((np.arange(n) * 3) % 10).astype(np.uint8)
        img_name, lab_name = FASHION_MNIST_FILES[split]
        write_idx_file(src / img_name, images, gz=True)
        write_idx_file(src / lab_name, labels, gz=True)
        arrays[split] = (images, labels)
    return arrays


def test_fashion_mnist_from_a_fake_source_writes_train_val_and_classes(tmp_path):
    src = tmp_path / "src"
    arrays = make_fake_fashion(src)
    # A raw (un-gzipped) copy is taken where the .gz is absent.
    raw_labels = src / FASHION_MNIST_FILES["val"][1].removesuffix(".gz")
    write_idx_file(raw_labels, arrays["val"][1])
    (src / FASHION_MNIST_FILES["val"][1]).unlink()
    assert fashion_mnist_files(str(src))["val"][1] == str(raw_labels)

    out = tmp_path / "out"
    result = write_fashion_mnist(str(out), FashionMnistConfig(source=str(src), image_size=32, shard_size=16))
    assert result.samples("train") == 30 and result.samples("val") == 10
    assert [p.name for p in _tars(out)] == ["train-000000.tar", "train-000001.tar", "val-000000.tar"]
    classes = json.loads((out / "classes.json").read_text())
    assert classes["classes"] == list(FASHION_MNIST_CLASSES) and len(classes["classes"]) == 10
    assert classes["classes"][0] == "T-shirt/top" and classes["classes"][-1] == "Ankle boot"
    assert classes["class_to_idx"]["Ankle boot"] == 9
    assert json.loads((out / "shards.json").read_text())["total_samples"] == 40
    assert json.loads((out / "train.shards.json").read_text())["total_samples"] == 30
    assert json.loads((out / "val.shards.json").read_text())["total_samples"] == 10

    ds = open_dataset(str(out))
    assert ds.classes == list(FASHION_MNIST_CLASSES)
    for split, (_, labels) in arrays.items():
        samples = _wds_samples(out, split)
        assert [int(s["cls"]) for s in samples] == labels.tolist()
        assert all(Image.open(io.BytesIO(s["png"])).size == (32, 32) for s in samples)


def test_fashion_mnist_label_outside_0_9_is_an_error_naming_the_file(tmp_path):
    src = tmp_path / "src"
    arrays = make_fake_fashion(src)
    labels = arrays["val"][1].copy()
    labels[4] = 10  # fine for a generic IDX pair, not for Fashion-MNIST's 10 classes
    bad = write_idx_file(src / FASHION_MNIST_FILES["val"][1], labels, gz=True)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=re.escape(str(bad)) + r": label 10 at index 4 is outside 0\.\.9"):
        write_fashion_mnist(str(out), FashionMnistConfig(source=str(src), shard_size=16))
    _assert_nothing_written(out)  # train's files were fine, but no split is written
    assert not (out / "classes.json").exists()


@pytest.mark.parametrize("which", [0, 1, 2, 3])
def test_fashion_mnist_missing_file_is_an_error_naming_it(tmp_path, which):
    src = tmp_path / "src"
    make_fake_fashion(src)
    name = [n for pair in FASHION_MNIST_FILES.values() for n in pair][which]
    (src / name).unlink()
    out = tmp_path / "out"
    with pytest.raises(InputError, match=re.escape(str(src / name)) + ": no such file"):
        write_fashion_mnist(str(out), FashionMnistConfig(source=str(src), shard_size=16))
    _assert_nothing_written(out)


# --- 5. the real Fashion-MNIST files ----------------------------------------------------------------------


def test_real_fashion_mnist_files_and_cli(tmp_path):
    if not Path(FASHION_MNIST_SOURCE).is_dir():
        pytest.skip(
            f"{FASHION_MNIST_SOURCE} is absent: install Debian's package dataset-fashion-mnist "
            "(apt-get install dataset-fashion-mnist) to run this test"
        )
    files = fashion_mnist_files(FASHION_MNIST_SOURCE)
    for split, n in (("train", 60_000), ("val", 10_000)):
        images, labels = read_idx_pair(*files[split], num_classes=10)
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (n,)
        assert np.bincount(labels, minlength=10).tolist() == [n // 10] * 10
        assert 0 < images.mean() < 255  # real pictures, not a blank array

    out = tmp_path / "fm"
    result = runner.invoke(app, ["data", "fashion-mnist", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote 70000 samples" in result.output
    assert json.loads((out / "shards.json").read_text())["total_samples"] == 70_000
    assert json.loads((out / "train.shards.json").read_text())["total_samples"] == 60_000
    assert json.loads((out / "val.shards.json").read_text())["total_samples"] == 10_000
    ds = open_dataset(str(out))
    assert ds.num_samples == 70_000 and ds.classes == list(FASHION_MNIST_CLASSES)
    assert open_dataset(str(out / "train.shards.json")).num_samples == 60_000
    val = open_dataset(str(out / "val.shards.json"))
    assert val.num_samples == 10_000
    stats = ReadStats()
    counts = np.zeros(10, dtype=int)
    first = None
    for shard in val.shards:
        for sample in iter_samples(shard, stats, require_label=True):
            counts[sample.label] += 1
            first = first or sample
    assert stats.samples == 10_000 and stats.num_skipped == 0
    assert counts.tolist() == [1_000] * 10
    assert Image.open(io.BytesIO(first.image)).size == (32, 32)


# --- 6. the `kmim data idx` command ----------------------------------------------------------------------


def test_cli_idx_writes_the_named_split(tmp_path):
    img, lab, images, labels = make_pair(tmp_path / "src", n=12, gz=True)
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["data", "idx", str(img), str(lab), str(out), "--split", "val", "--image-size", "0"]
    )
    assert result.exit_code == 0, result.output
    assert "wrote 12 samples" in result.output and "val: 12" in result.output
    assert [p.name for p in _tars(out)] == ["val-000000.tar"]
    assert (out / "val.shards.json").is_file() and not (out / "train.shards.json").exists()
    samples = _wds_samples(out, "val")
    assert [int(s["cls"]) for s in samples] == labels.tolist()
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(samples[5]["png"]))), images[5])


def test_cli_idx_bad_file_is_one_line_without_traceback(tmp_path):
    img, lab, _, _ = make_pair(tmp_path / "src", n=12)
    img.write_bytes(img.read_bytes()[:-3])
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "kmim", "data", "idx", str(img), str(lab), str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(img) in lines[0] and "truncated" in lines[0]
    _assert_nothing_written(out)
