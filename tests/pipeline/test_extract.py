"""`kmim pipeline extract` on a real local Ray, real shards, real Arrow IPC feature files."""

import hashlib
import io
import json
import os

import numpy as np
import pyarrow as pa
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from kmim.contract.images import decode_rgb
from kmim.contract.patches import patchify
from kmim.contract.views import ViewSpec, apply_view, center_view, normalize, to_uint8_array
from kmim.data.reader import ReadStats, iter_samples, open_dataset
from kmim.data.tar import write_tar_shard
from kmim.errors import InputError
from kmim.pipeline.extract import ExtractConfig, extract
from kmim.pipeline.stage import StageFailed

pytestmark = pytest.mark.usefixtures("ray_local")


def _view0(sample, spec):
    img = decode_rgb(sample.image)
    return to_uint8_array(apply_view(img, center_view(img.width, img.height, spec)))


def _samples(spec_url):
    stats = ReadStats()
    return [s for shard in open_dataset(spec_url).shards for s in iter_samples(shard, stats)]


def test_pixel_features_are_patchify_of_view0(digits_dir, tmp_path):
    out = tmp_path / "feat"
    config = ExtractConfig(image_size=32, patch_size=4, dtype="float32", batch_size=100)
    result = extract(str(digits_dir), str(out), config)
    m = result.manifest
    assert (
        result.ran and m.stats["samples"] == 1797 and m.stats["patches"] == 1797 * 64 and m.stats["dim"] == 48
    )
    assert len(m.outputs) == 8 and (out / "manifest.json").exists()
    table = pa.ipc.open_file(out / "val-000001.arrow").read_all()
    assert table.num_rows == 103 * 64
    assert table.schema.field("feature").type.list_size == 48
    samples = {s.key: s for s in _samples(str(digits_dir / "val-000001.tar"))}
    spec = ViewSpec(32)
    keys = table.column("key").to_pylist()
    feats = np.asarray(table.column("feature").combine_chunks().flatten()).reshape(-1, 48)
    for i in (0, 64 * 50, 64 * 102):
        key = keys[i]
        expected = patchify(normalize(torch.from_numpy(_view0(samples[key], spec).copy())), 4)[0]
        assert np.array_equal(feats[i : i + 64], expected.numpy()), key
        assert table.column("label")[i].as_py() == samples[key].label
    assert table.column("patch").to_pylist()[:64] == list(range(64))
    stats = json.loads((out / "val-000001_stats.json").read_text())
    assert set(stats["seconds"]) == {"read", "decode", "compute", "write", "total"}
    assert hashlib.sha256((out / "val-000001.arrow").read_bytes()).hexdigest() == stats["output"]["sha256"]
    assert stats["output"]["url"] == "val-000001.arrow" and not list(out.glob("*.parquet"))


def test_rerun_on_finished_output_is_a_noop_and_other_config_is_refused(synthetic_dir, tmp_path):
    out = str(tmp_path / "f")
    config = ExtractConfig(image_size=32, patch_size=8)
    first = extract(str(synthetic_dir), out, config)
    mtime = os.path.getmtime(tmp_path / "f" / "manifest.json")
    again = extract(str(synthetic_dir), out, config)
    assert not again.ran and again.manifest.fingerprint == first.manifest.fingerprint
    assert os.path.getmtime(tmp_path / "f" / "manifest.json") == mtime
    with pytest.raises(InputError, match="other inputs or config"):
        extract(str(synthetic_dir), out, ExtractConfig(image_size=32, patch_size=16))


def test_patch_sample_and_float16(synthetic_dir, tmp_path):
    config = ExtractConfig(image_size=32, patch_size=8, patches_per_image=5, dtype="float16")
    m = extract(str(synthetic_dir), str(tmp_path / "a"), config).manifest
    assert m.stats["patches"] == 60 * 5
    t = pa.ipc.open_file(tmp_path / "a" / "train-000000.arrow").read_all()
    assert str(t.schema.field("feature").type.value_type) == "halffloat"
    per_key = {}
    for k, p in zip(t.column("key").to_pylist(), t.column("patch").to_pylist()):
        per_key.setdefault(k, []).append(p)
    assert all(len(v) == 5 and v == sorted(v) and len(set(v)) == 5 for v in per_key.values())
    assert len({tuple(v) for v in per_key.values()}) > 1  # sampled per image, not one fixed subset
    assert t.schema.metadata[b"kmim_feature_format"] == b"2"


def test_two_extracts_of_the_same_data_are_byte_identical_arrow_files(synthetic_dir, tmp_path):
    config = ExtractConfig(image_size=32, patch_size=8, patches_per_image=5, dtype="float16", batch_size=4)
    for name in ("a", "b"):
        extract(str(synthetic_dir), str(tmp_path / name), config)
    files = sorted(p.name for p in (tmp_path / "a").glob("*.arrow"))
    assert len(files) == 4 and files == sorted(p.name for p in (tmp_path / "b").glob("*.arrow"))
    for name in files:
        raw = (tmp_path / "a" / name).read_bytes()
        assert raw[:6] == b"ARROW1" and raw == (tmp_path / "b" / name).read_bytes(), name
        assert pa.ipc.open_file(tmp_path / "a" / name).num_record_batches == 4  # one per batch of 4 of 15


def test_feature_writer_bytes_depend_only_on_the_inputs(tmp_path):
    from kmim import fs
    from kmim.pipeline.extract import FeatureShardWriter

    def write(path, junk):
        _ = [np.full(1 << 16, junk, np.int64) for _ in range(8)]  # other bytes in freed memory
        rng = np.random.default_rng(0)
        with fs.atomic_open(str(path)) as sink:
            writer = FeatureShardWriter(sink, 6, "float32")
            for b in range(3):
                labels = [None if (i + b) % 3 == 0 else i for i in range(7)]
                writer.write(
                    [f"k{b}-{i}" for i in range(7)],
                    labels,
                    [np.arange(3)] * 7,
                    [rng.standard_normal((3, 6)) for _ in range(7)],
                )
            writer.close()
        return sink

    a, b = write(tmp_path / "a.arrow", -1), write(tmp_path / "b.arrow", 7)
    assert (tmp_path / "a.arrow").read_bytes() == (tmp_path / "b.arrow").read_bytes()
    assert a.hexdigest() == b.hexdigest() and a.nbytes == (tmp_path / "a.arrow").stat().st_size
    table = pa.ipc.open_file(tmp_path / "a.arrow").read_all()
    assert table.num_rows == 63 and table.column("label").to_pylist()[:6] == [None] * 3 + [1] * 3


def test_timm_tiny_vit_features_match_a_direct_forward(synthetic_dir, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32).eval()
    weights = tmp_path / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    config = ExtractConfig(
        extractor="timm:test_vit", weights=str(weights), image_size=32, patch_size=16, dtype="float32"
    )
    m = extract(str(synthetic_dir / "train-000002.tar"), str(tmp_path / "f"), config).manifest
    assert m.stats["dim"] == 64 and m.stats["patches"] == 15 * 4
    assert m.config["extractor"]["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    t = pa.ipc.open_file(tmp_path / "f" / "train-000002.arrow").read_all()
    feats = np.asarray(t.column("feature").combine_chunks().flatten()).reshape(-1, 4, 64)
    first = _samples(str(synthetic_dir / "train-000002.tar"))[:3]
    views = np.stack([_view0(s, ViewSpec(32)) for s in first])
    with torch.inference_mode():
        direct = model.forward_features(normalize(torch.from_numpy(views)))[:, 1:]
    np.testing.assert_allclose(feats[:3], direct.numpy(), rtol=1e-4, atol=1e-4)


def test_pth_weights_load_with_weights_only_and_mismatch_is_an_error(tmp_path, synthetic_dir):
    model = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32)
    torch.save({"model": model.state_dict()}, tmp_path / "ok.pth")
    m = extract(
        str(synthetic_dir / "train-000000.tar"),
        str(tmp_path / "a"),
        ExtractConfig(extractor="timm:test_vit", weights=str(tmp_path / "ok.pth"), image_size=32),
    ).manifest
    assert m.stats["samples"] == 15
    torch.save({"model": {"blocks.0.norm1.weight": torch.ones(3)}}, tmp_path / "bad.pth")
    with pytest.raises(StageFailed, match="weights do not fit"):
        extract(
            str(synthetic_dir / "train-000000.tar"),
            str(tmp_path / "b"),
            ExtractConfig(
                extractor="timm:test_vit", weights=str(tmp_path / "bad.pth"), image_size=32, max_retries=0
            ),
        )


def _png(v):
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), (v, v, v)).save(buf, format="PNG")
    return buf.getvalue()


def test_corrupt_samples_are_counted_and_a_broken_shard_is_retried_then_reported(tmp_path):
    data = tmp_path / "data"
    with write_tar_shard(str(data / "good-000000.tar")) as sink:
        for i in range(6):
            sink.write(f"s{i}", {"png": _png(i * 20) if i != 3 else b"broken", "cls": b"1"})
    out = str(tmp_path / "f")
    m = extract(str(data), out, ExtractConfig(image_size=16, patch_size=8)).manifest
    assert m.stats["samples"] == 5 and m.stats["num_skipped"] == 1
    assert m.stats["skipped"][0]["key"] == "s3" and "cannot decode" in m.stats["skipped"][0]["reason"]
    tar = (data / "good-000000.tar").read_bytes()
    (data / "cut-000000.tar").write_bytes(tar[: len(tar) // 2])
    with pytest.raises(StageFailed, match=r"cut-000000: ShardReadError.*truncated"):
        extract(str(data), str(tmp_path / "g"), ExtractConfig(image_size=16, patch_size=8, max_retries=1))
    failures = json.loads((tmp_path / "g" / "_failures.json").read_text())
    assert list(failures) == ["cut-000000"]
    assert (tmp_path / "g" / "good-000000_stats.json").exists() and not (
        tmp_path / "g" / "manifest.json"
    ).exists()


def test_a_key_in_two_shards_is_one_error_naming_both_and_no_manifest(tmp_path):
    data = tmp_path / "data"
    for n, keys in enumerate([["a", "b", "c"], ["d", "b", "e"]]):  # "b" is in both shards
        with write_tar_shard(str(data / f"part-{n:06d}.tar")) as sink:
            for i, key in enumerate(keys):
                sink.write(key, {"png": _png(i * 30), "cls": b"1"})
    out = tmp_path / "f"
    with pytest.raises(InputError, match=r"part-000001.tar.*key 'b' is also in .*part-000000.tar"):
        extract(str(data), str(out), ExtractConfig(image_size=16, patch_size=8))
    assert not (out / "manifest.json").exists()
    # decode failures are in no output, so a corrupt copy of a key elsewhere is no duplicate
    with write_tar_shard(str(data / "part-000001.tar")) as sink:
        sink.write("d", {"png": _png(10), "cls": b"1"})
        sink.write("b", {"png": b"broken", "cls": b"1"})
    m = extract(str(data), str(tmp_path / "g"), ExtractConfig(image_size=16, patch_size=8)).manifest
    assert m.stats["samples"] == 4 and [s["key"] for s in m.stats["skipped"]] == ["b"]
