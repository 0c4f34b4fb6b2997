"""The Codebook type (kmim/contract/codebook.py): its format, its checks, its nearest-center search, and the
typed per-shard stats of the shard stages (pipeline/executor.py), without Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save, save_file

from kmim import fs
from kmim.contract.codebook import Assigner, Codebook, centers_file, normalize_rows
from kmim.errors import InputError
from kmim.pipeline.executor import ShardStats
from kmim.tokenizer import load_codebook

META = {
    "format_version": 1,
    "kmim_version": "0.1.0",
    "k": 6,
    "dim": 4,
    "extractor": {
        "name": "pixel",
        "image_size": 32,
        "patch_size": 4,
        "weights": None,
        "weights_sha256": None,
        "fingerprint": "f" * 64,
    },
    "extractor_fingerprint": "f" * 64,
    "view": {"image_size": 32, "patch_size": 4, "crop_pct": 0.875},
    "init": "kmeans++",
    "seed": 3,
    "spherical": False,
    "cluster_sizes": [1, 2, 3, 4, 5, 6],
}


def _centers(k: int = 6, dim: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((k, dim)).astype(np.float32)


def _folder(
    tmp_path,
    name: str = "cb",
    centers: np.ndarray | None = None,
    meta: dict | None = None,
    manifest: bool = True,
):
    out = tmp_path / name
    Codebook(_centers() if centers is None else centers, dict(META if meta is None else meta)).save(str(out))
    if manifest:
        (out / "manifest.json").write_text("{}")
    return out


def test_round_trip_keeps_centers_metadata_and_bytes(tmp_path):
    centers = _centers()
    out = _folder(tmp_path, centers=centers)
    book = Codebook.load(str(out))
    assert book.centers.dtype == np.float32 and np.array_equal(book.centers, centers)
    assert book.meta == META and book.url == str(out)
    assert (book.k, book.dim, book.spherical, book.init, book.seed) == (6, 4, False, "kmeans++", 3)
    assert book.extractor["name"] == "pixel" and book.extractor_fingerprint == "f" * 64
    assert book.view_spec.image_size == 32 and book.patch_size == 4 and book.get("cluster_sizes")[-1] == 6
    # the format the cluster stage has always written: one `centers` tensor, codebook.json as fs writes JSON
    assert (out / "codebook.safetensors").read_bytes() == save({"centers": centers})
    fs.write_json_atomic(str(tmp_path / "meta.json"), META)
    assert (out / "codebook.json").read_bytes() == (tmp_path / "meta.json").read_bytes()
    book.save(str(tmp_path / "again"))
    for name in ("codebook.safetensors", "codebook.json"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()
    c, m = load_codebook(str(out))  # the kmim 0.1 tuple
    assert np.array_equal(c, centers) and m == META


def test_bare_centers_file_and_save_fills_in_the_shape(tmp_path):
    x = _centers(5, 3).astype(np.float64)
    save_file({"centers": x}, str(tmp_path / "init.safetensors"))
    book = Codebook.load(str(tmp_path / "init.safetensors"))
    assert book.meta == {} and (book.k, book.dim) == (5, 3) and book.centers.dtype == np.float32
    assert np.array_equal(book.centers, x.astype(np.float32))
    assert centers_file(str(tmp_path / "init.safetensors")) == str(tmp_path / "init.safetensors")
    assert centers_file(str(tmp_path / "cb")).endswith("cb/codebook.safetensors")
    with pytest.raises(InputError, match="records no view"):
        _ = book.view_spec
    book.save(str(tmp_path / "folder"))
    again = Codebook.load(str(tmp_path / "folder"), require_manifest=False)
    assert again.meta == {"format_version": 1, "k": 5, "dim": 3} and np.array_equal(
        again.centers, book.centers
    )
    with pytest.raises(ValueError, match="metadata says"):
        Codebook(_centers(), {"k": 7, "dim": 4}).save(str(tmp_path / "bad"))


def _one_line_error(url: str, **kw) -> InputError:
    with pytest.raises(InputError) as info:
        Codebook.load(url, **kw)
    assert "\n" not in str(info.value)
    return info.value


def test_every_bad_codebook_is_one_error_naming_the_file(tmp_path):
    # missing files
    e = _one_line_error(str(tmp_path / "nothing"))
    assert "not a finished `kmim pipeline cluster` output" in e.reason and "codebook.json" in e.reason
    out = _folder(tmp_path, "nomanifest", manifest=False)
    e = _one_line_error(str(out))
    assert e.where == str(out) and "no manifest.json" in e.reason
    assert Codebook.load(str(out), require_manifest=False).k == 6
    (out / "codebook.safetensors").unlink()
    assert "no codebook.safetensors" in _one_line_error(str(out), require_manifest=False).reason
    e = _one_line_error(str(tmp_path / "missing.safetensors"))
    assert e.where.endswith("missing.safetensors") and "no such centers file" in e.reason

    # no `centers` tensor
    out = _folder(tmp_path, "notensor")
    save_file({"weights": _centers()}, str(out / "codebook.safetensors"))
    e = _one_line_error(str(out))
    assert e.where == str(out / "codebook.safetensors") and "no 'centers' tensor (has: weights)" in e.reason

    # not a safetensors file at all
    (out / "codebook.safetensors").write_bytes(b"not a safetensors file")
    e = _one_line_error(str(out))
    assert e.where == str(out / "codebook.safetensors") and "not a safetensors file" in e.reason

    # shape differs from codebook.json
    out = _folder(tmp_path, "shape")
    save_file({"centers": _centers(5, 4)}, str(out / "codebook.safetensors"))
    e = _one_line_error(str(out))
    assert e.where == str(out / "codebook.safetensors")
    assert e.reason == "centers have shape (5, 4), codebook.json says (6, 4)"

    # not floating point
    save_file({"centers": np.ones((6, 4), np.int32)}, str(out / "codebook.safetensors"))
    e = _one_line_error(str(out))
    assert (
        e.where == str(out / "codebook.safetensors") and "'centers' is int32, not floating point" in e.reason
    )

    # not finite
    bad = _centers()
    bad[2, 1] = np.nan
    bad[4, 0] = np.inf
    save_file({"centers": bad}, str(out / "codebook.safetensors"))
    e = _one_line_error(str(out))
    assert (
        e.where == str(out / "codebook.safetensors")
        and e.reason == "2 centers hold NaN or Inf (first: row 2)"
    )
    save_file({"centers": bad}, str(tmp_path / "bad.safetensors"))
    assert "NaN or Inf" in _one_line_error(str(tmp_path / "bad.safetensors")).reason

    # not a matrix
    save_file({"centers": np.ones(4, np.float32)}, str(tmp_path / "vector.safetensors"))
    assert "expected [K, D]" in _one_line_error(str(tmp_path / "vector.safetensors")).reason

    # codebook.json: not JSON, no k, a newer format
    out = _folder(tmp_path, "meta")
    (out / "codebook.json").write_text("{broken")
    e = _one_line_error(str(out))
    assert e.where == str(out / "codebook.json") and "not valid JSON" in e.reason
    (out / "codebook.json").write_text(json.dumps({k: v for k, v in META.items() if k != "k"}))
    assert "'k' is missing or not an integer" in _one_line_error(str(out)).reason
    (out / "codebook.json").write_text(json.dumps({**META, "format_version": 99}))
    assert "format_version 99 is newer" in _one_line_error(str(out)).reason


def test_cpu_assignment_is_the_brute_force_argmin():
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((32, 8)).astype(np.float32) * 3
    book = Codebook(centers, {"k": 32, "dim": 8})
    truth = rng.integers(0, 32, 2000)
    near = centers[truth] + 0.05 * rng.standard_normal((2000, 8)).astype(np.float32)
    d = ((near[:, None, :].astype(np.float64) - centers[None].astype(np.float64)) ** 2).sum(-1)
    labels = book.assign(near)
    assert labels.dtype == np.int64 and np.array_equal(labels, d.argmin(1)) and np.array_equal(labels, truth)
    # anywhere in space: the chosen center is at the minimum distance (ties aside), and d2 is that distance
    x = rng.standard_normal((3000, 8)).astype(np.float32) * 4
    d = ((x[:, None, :].astype(np.float64) - centers[None].astype(np.float64)) ** 2).sum(-1)
    d2, labels = Assigner(centers).assign(x)
    best = d.min(1)
    assert np.allclose(d[np.arange(len(x)), labels], best, rtol=1e-5, atol=1e-4)
    assert np.allclose(d2, best, rtol=1e-4, atol=1e-3)
    clear = np.sort(d, 1)[:, 1] - best > 1e-3 * (1 + best)
    assert clear.mean() > 0.99 and np.array_equal(labels[clear], d.argmin(1)[clear])
    assert book.assigner() is book.assigner()  # the index is built once
    with pytest.raises(ValueError, match="dim is 8"):
        book.assign(x[:, :4])


def test_spherical_codebooks_assign_unit_rows():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((500, 6)).astype(np.float32)
    unit = normalize_rows(x)
    assert np.allclose(np.linalg.norm(unit, axis=1), 1, atol=1e-6)
    assert np.array_equal(normalize_rows(np.zeros((2, 6), np.float32)), np.zeros((2, 6), np.float32))
    centers = normalize_rows(rng.standard_normal((10, 6)).astype(np.float32))
    spherical = Codebook(centers, {"k": 10, "dim": 6, "spherical": True})
    assert spherical.spherical and not Codebook(centers).spherical
    cosine = (unit.astype(np.float64) @ centers.T.astype(np.float64)).argmax(
        1
    )  # nearest unit center = max cosine
    labels = spherical.assign(x)
    margin = np.sort(unit @ centers.T, 1)
    clear = margin[:, -1] - margin[:, -2] > 1e-4
    assert np.array_equal(labels[clear], cosine[clear])
    scale = rng.uniform(0.1, 50, (500, 1)).astype(np.float32)  # the length of a feature does not matter
    assert np.array_equal(spherical.assign(x * scale)[clear], labels[clear])
    # `spherical` normalises the features (the centers are stored unit-norm by the cluster stage)
    long = centers * rng.uniform(0.2, 5, (10, 1)).astype(np.float32)
    flagged = Codebook(long, {"k": 10, "dim": 6, "spherical": True}).assign(x * 10)
    assert np.array_equal(flagged, Assigner(long).assign(unit)[1])
    assert not np.array_equal(flagged, Codebook(long, {"k": 10, "dim": 6}).assign(x * 10))


def test_shard_stats_keep_the_stats_file_format(tmp_path):
    extract_stats = {
        "shard": "train-000000",
        "input": "/d/train-000000.tar",
        "fingerprint": "ab" * 32,
        "samples": 256,
        "patches": 16384,
        "dim": 48,
        "num_skipped": 1,
        "skipped": [{"key": "x", "reason": "cannot decode"}],
        "seconds": {"read": 0.1, "decode": 0.2, "compute": 0.3, "write": 0.05, "total": 0.7},
        "output": {"url": "train-000000.parquet", "rows": 16384, "bytes": 1000, "sha256": "cd" * 32},
    }
    tokenize_stats = {k: v for k, v in extract_stats.items() if k not in ("patches", "dim")}
    for d in (extract_stats, tokenize_stats):
        s = ShardStats.from_json(json.loads(json.dumps(d)))
        assert list(s.to_json().items()) == list(d.items())  # same keys, values and order
        s.arrays = {"cooc": np.zeros((2, 2))}  # in memory only
        s.commit(str(tmp_path))
        assert json.loads((tmp_path / "train-000000_stats.json").read_text()) == d
    assert ShardStats.from_json(extract_stats).extra == {"patches": 16384, "dim": 48}


@pytest.mark.parametrize("dim,k", [(8, 32), (48, 50), (96, 700)])
def test_the_torch_assignment_is_the_brute_force_argmin_across_blocks(dim, k, monkeypatch):
    monkeypatch.setattr(Assigner, "BLOCK_ELEMENTS", 64 * k + 7)  # several blocks, the last one short
    rng = np.random.default_rng(dim)
    centers = rng.standard_normal((k, dim)).astype(np.float32) * 2
    x = rng.standard_normal((1500, dim)).astype(np.float32) * 3
    d = ((x[:, None, :].astype(np.float64) - centers[None].astype(np.float64)) ** 2).sum(-1)
    torch_assigner = Assigner(centers, backend="torch")
    assert torch_assigner.backend == "torch" and not torch_assigner.on_gpu
    d2, labels = torch_assigner.assign(x)
    best = d.min(1)
    assert labels.dtype == np.int64 and d2.dtype == np.float32
    assert np.allclose(d[np.arange(len(x)), labels], best, rtol=1e-5, atol=1e-3)
    assert np.allclose(d2, best, rtol=1e-4, atol=1e-2)
    clear = np.sort(d, 1)[:, 1] - best > 1e-3 * (1 + best)  # ties aside
    assert clear.mean() > 0.9 and np.array_equal(labels[clear], d.argmin(1)[clear])
    assert np.array_equal(labels[clear], Assigner(centers).assign(x)[1][clear])  # faiss agrees
    assert Assigner(centers).backend == "faiss"  # the CPU default: faiss, measured faster on one thread
    with pytest.raises(ValueError, match="backend must be"):
        Assigner(centers, backend="numpy")
