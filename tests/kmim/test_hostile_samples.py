"""Hostile samples in real tars: bad labels, repeated members and keys, unsafe names are counted skips."""

import io
import tarfile

import numpy as np
from PIL import Image

from kmim.contract.images import ImageDecodeError, decode_rgb
from kmim.data.reader import MAX_CLASSES, ReadStats, iter_samples, open_dataset


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _read(path):
    stats = ReadStats()
    samples = [s for shard in open_dataset(str(path)).shards for s in iter_samples(shard, stats)]
    return samples, {s["key"]: s["reason"] for s in stats.skipped}


def test_bad_labels_are_skips_and_the_good_samples_of_the_shard_stay(tmp_path):
    members = []
    for key, label in [
        ("a", b"3"),
        ("b", b"-3"),
        ("c", b"1000000000"),
        ("d", b"99999999999"),
        ("e", b"x"),
        ("f", str(MAX_CLASSES - 1).encode()),
    ]:
        members += [(f"{key}.png", _png(10)), (f"{key}.cls", label)]
    _tar(tmp_path / "s.tar", members)
    samples, skipped = _read(tmp_path / "s.tar")
    assert [(s.key, s.label) for s in samples] == [("a", 3), ("f", MAX_CLASSES - 1)]
    assert set(skipped) == {"b", "c", "d", "e"} and "outside [0, 65536)" in skipped["b"]


def test_all_negative_labels_lose_nothing_silently(tmp_path):
    _tar(tmp_path / "s.tar", [("a.png", _png(1)), ("a.cls", b"-1"), ("b.png", _png(2)), ("b.cls", b"-2")])
    samples, skipped = _read(tmp_path / "s.tar")
    assert samples == [] and sorted(skipped) == ["a", "b"]


def test_repeated_members_and_keys_are_skips_not_silent_drops(tmp_path):
    _tar(
        tmp_path / "s.tar",
        [("a.png", _png(1)), ("a.png", _png(2)), ("b.png", _png(3)), ("c.png", _png(4)), ("b.png", _png(5))],
    )
    samples, skipped = _read(tmp_path / "s.tar")
    assert [s.key for s in samples] == ["b", "c"]
    assert "given twice" in skipped["a"] and "duplicate key" in skipped["b"]


def test_unsafe_keys_never_reach_a_member_name(tmp_path):
    _tar(
        tmp_path / "s.tar",
        [("../../x.png", _png(1)), ("/abs/y.png", _png(2)), ("ok/z.png", _png(3)), ("./w.png", _png(4))],
    )
    samples, skipped = _read(tmp_path / "s.tar")
    assert [s.key for s in samples] == ["ok/z", "./w"]
    assert set(skipped) == {"../../x", "/abs/y"}


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path):
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")  # ~50 KB of bytes, 400 MP of pixels
    try:
        decode_rgb(buf.getvalue())
    except ImageDecodeError as e:
        assert "decompression-bomb limit" in str(e)
    else:
        raise AssertionError("a 400-megapixel image was decoded")


def test_symlinks_out_of_the_folder_are_listed_skips_not_shipped(tmp_path):
    import json
    import os

    from kmim.data.folder import FolderShardConfig, shard_folder

    src, outside = tmp_path / "src", tmp_path / "outside"
    (src / "cat").mkdir(parents=True)
    (outside / "dog").mkdir(parents=True)
    (src / "cat" / "a.png").write_bytes(_png(1))
    (outside / "secret.png").write_bytes(_png(200))
    (outside / "dog" / "d.png").write_bytes(_png(3))
    os.symlink(outside / "secret.png", src / "cat" / "leak.png")
    os.symlink(src / "cat" / "a.png", src / "cat" / "alias.png")  # inside the folder: followed
    os.symlink(outside / "dog", src / "dog")
    shard_folder(str(src), str(tmp_path / "out"), FolderShardConfig(shard_size=10))
    stats = json.loads((tmp_path / "out" / "_stats.json").read_text())
    reasons = {s["key"]: s["reason"] for s in stats["skipped"]}
    assert set(reasons) == {"cat/leak.png", "dog"} and "outside the folder" in reasons["dog"]
    with tarfile.open(next((tmp_path / "out").glob("*.tar"))) as tar:
        names = sorted(tar.getnames())
        payload = b"".join(tar.extractfile(n).read() for n in names)
    assert names == ["cat/a.cls", "cat/a.png", "cat/alias.cls", "cat/alias.png"] and _png(200) not in payload
