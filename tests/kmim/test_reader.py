"""The one reader: every way of naming a dataset, and every kind of bad input."""

import io
import json
import tarfile

import fsspec
import numpy as np
import pytest
from PIL import Image

from kmim.data.reader import ReadStats, iter_images, iter_samples, open_dataset
from kmim.data.tar import write_tar_shard
from kmim.errors import InputError, ShardReadError


def _png(value=128, size=(6, 5), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size, value if mode != "RGB" else (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def _write(url, samples):
    with write_tar_shard(url) as sink:
        for key, members in samples:
            sink.write(key, members)
    return sink.entry


def _read_all(spec, **kw):
    stats = ReadStats()
    ds = open_dataset(spec, **kw)
    samples = [s for shard in ds.shards for s in iter_samples(shard, stats)]
    return ds, samples, stats


def test_directory_brace_pattern_single_tar_and_index_read_the_same(digits_dir):
    d = str(digits_dir)
    _, by_dir, _ = _read_all(d)
    assert len(by_dir) == 1797
    _, by_brace, _ = _read_all(d + "/train-{000000..000005}.tar")
    _, by_index, _ = _read_all(d + "/train.shards.json")
    _, by_split, _ = _read_all(d, split="train")
    assert [s.key for s in by_brace] == [s.key for s in by_index] == [s.key for s in by_split]
    assert len(by_brace) == 1438
    _, one, _ = _read_all(d + "/val-000001.tar")
    assert len(one) == 359 - 256 and all(s.label is not None and s.ext == "png" for s in one)


def test_file_and_memory_urls(digits_dir, tmp_path):
    _, samples, _ = _read_all(f"file://{digits_dir}/val.shards.json")
    assert len(samples) == 359
    src = digits_dir / "val-000001.tar"
    with fsspec.open("memory://bucket/ds/val-000001.tar", "wb") as f:
        f.write(src.read_bytes())
    ds, samples, _ = _read_all("memory://bucket/ds")
    assert ds.shards[0].url.startswith("memory://") and len(samples) == 103


def test_image_folder_with_classes(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            (tmp_path / cls / f"img.{i}.png").write_bytes(_png(40 * i))
    (tmp_path / "notes.txt").write_text("not an image")
    ds = open_dataset(str(tmp_path), folder_shard_size=4)
    assert ds.classes == ["cat", "dog"] and len(ds.shards) == 2
    stats = ReadStats()
    samples = [s for sh in ds.shards for s in iter_samples(sh, stats)]
    assert [s.key for s in samples][:2] == ["cat/img_0", "cat/img_1"]
    assert [s.label for s in samples] == [0, 0, 0, 1, 1, 1]


def test_corrupt_image_is_a_counted_and_listed_skip(tmp_path):
    _write(
        str(tmp_path / "a.tar"),
        [
            ("ok1", {"png": _png(), "cls": b"1"}),
            ("bad", {"png": b"garbage", "cls": b"2"}),
            ("empty", {"png": b"", "cls": b"3"}),
            ("ok2", {"jpg": _png(), "cls": b"0"}),
        ],
    )
    stats = ReadStats()
    got = [s.key for s, img in iter_images(open_dataset(str(tmp_path)).shards[0], stats)]
    assert got == ["ok1", "ok2"]
    assert stats.samples == 2 and stats.num_skipped == 2
    reasons = {s["key"]: s["reason"] for s in stats.skipped}
    assert "cannot decode" in reasons["bad"] and "empty" in reasons["empty"]
    assert all(s["shard"].endswith("a.tar") for s in stats.skipped)


def test_missing_label_is_a_skip_when_labels_are_required(tmp_path):
    _write(
        str(tmp_path / "a.tar"),
        [
            ("x", {"png": _png(), "cls": b"1"}),
            ("nolabel", {"png": _png()}),
            ("badlabel", {"png": _png(), "cls": b"cat"}),
            ("noimage", {"cls": b"1"}),
        ],
    )
    shard = open_dataset(str(tmp_path)).shards[0]
    stats = ReadStats()
    assert [s.key for s in iter_samples(shard, stats)] == ["x", "nolabel"]
    assert {s["key"] for s in stats.skipped} == {"badlabel", "noimage"}
    stats = ReadStats()
    assert [s.key for s in iter_samples(shard, stats, require_label=True)] == ["x"]
    assert any(s["key"] == "nolabel" and "missing label" in s["reason"] for s in stats.skipped)


def test_truncated_tar_is_an_error_naming_the_file(tmp_path):
    entry = _write(str(tmp_path / "full.tar"), [(f"k{i}", {"png": _png(i), "cls": b"1"}) for i in range(20)])
    data = (tmp_path / "full.tar").read_bytes()
    with tarfile.open(tmp_path / "full.tar") as t:
        boundary = t.getmembers()[10].offset  # a cut exactly between two members
    for name, cut in [("mid.tar", len(data) // 2 + 100), ("boundary.tar", boundary)]:
        d = tmp_path / name.replace(".tar", "")
        d.mkdir()
        (d / name).write_bytes(data[:cut])
        with pytest.raises(ShardReadError, match=rf"{name}.*truncated"):
            list(iter_samples(open_dataset(str(d)).shards[0], ReadStats()))
    assert entry.bytes == len(data)


def test_truncated_shard_is_caught_by_the_index_size(tmp_path):
    entry = _write(str(tmp_path / "s-000000.tar"), [("k", {"png": _png(), "cls": b"1"})])
    (tmp_path / "shards.json").write_text(json.dumps({"shards": [entry.__dict__]}))
    (tmp_path / "s-000000.tar").write_bytes((tmp_path / "s-000000.tar").read_bytes()[:-2048])
    with pytest.raises(ShardReadError, match="s-000000.tar.*index says"):
        list(iter_samples(open_dataset(str(tmp_path)).shards[0], ReadStats()))


def test_empty_file_and_non_tar_are_errors(tmp_path):
    (tmp_path / "e.tar").write_bytes(b"")
    with pytest.raises(ShardReadError, match=r"e\.tar: empty file"):
        list(iter_samples(open_dataset(str(tmp_path / "e.tar")).shards[0], ReadStats()))
    (tmp_path / "n.tar").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ShardReadError, match=r"n\.tar"):
        list(iter_samples(open_dataset(str(tmp_path / "n.tar")).shards[0], ReadStats()))


def test_empty_dataset_and_missing_paths_are_errors(tmp_path):
    with pytest.raises(InputError, match="empty dataset"):
        open_dataset(str(tmp_path))
    with pytest.raises(InputError, match="no such"):
        open_dataset(str(tmp_path / "nope"))
    with pytest.raises(InputError, match="no such shard"):
        open_dataset(str(tmp_path / "x-{0..1}.tar"))
    (tmp_path / "shards.json").write_text(json.dumps({"shards": []}))
    with pytest.raises(InputError, match="empty dataset"):
        open_dataset(str(tmp_path))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match=r"bad\.json: not valid JSON"):
        open_dataset(str(tmp_path / "bad.json"))


def test_webdataset_reads_what_we_write(tmp_path):
    import webdataset as wds

    _write(
        str(tmp_path / "a.tar"), [(f"k{i}", {"png": _png(10 * i), "cls": str(i).encode()}) for i in range(5)]
    )
    got = [
        (s["__key__"], s["cls"], s["png"].size)
        for s in wds.WebDataset(str(tmp_path / "a.tar"), shardshuffle=False).decode("pil")
    ]
    assert got == [(f"k{i}", i, (6, 5)) for i in range(5)]
