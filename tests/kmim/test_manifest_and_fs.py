import pytest

from kmim import fs
from kmim.contract.manifest import InputRef, StageManifest, fingerprint_inputs


def test_fingerprint_depends_on_content_and_config_not_location():
    a = [InputRef("s3://b/x/train-0.tar", 10, sha256="aa")]
    moved = [InputRef("/local/train-0.tar", 10, sha256="aa")]
    changed = [InputRef("s3://b/x/train-0.tar", 10, sha256="ab")]
    assert fingerprint_inputs(a) == fingerprint_inputs(moved) != fingerprint_inputs(changed)
    m1 = StageManifest.build("extract", {"k": 1}, a)
    assert m1.fingerprint == StageManifest.build("extract", {"k": 1}, moved).fingerprint
    assert m1.fingerprint != StageManifest.build("extract", {"k": 2}, a).fingerprint
    assert m1.fingerprint != StageManifest.build("tokenize", {"k": 1}, a).fingerprint


def test_manifest_round_trip_and_commit_marker(tmp_path):
    out = str(tmp_path / "stage")
    assert StageManifest.read_if_committed(out) is None
    m = StageManifest.build("extract", {"k": 1}, [InputRef("a.tar", 3, sha256="x")], outputs=[{"name": "a"}])
    m.write(out)
    assert StageManifest.read_if_committed(out) == m


def test_atomic_open_commits_only_on_success(tmp_path):
    url = str(tmp_path / "sub" / "f.bin")
    with pytest.raises(RuntimeError):
        with fs.atomic_open(url) as f:
            f.write(b"partial")
            raise RuntimeError("killed")
    assert not (tmp_path / "sub" / "f.bin").exists()
    assert list((tmp_path / "sub").iterdir()) == []
    sha = fs.write_bytes_atomic(url, b"done")
    assert (tmp_path / "sub" / "f.bin").read_bytes() == b"done" and sha == fs.sha256_of(url)


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / f"{fs.TMP_PREFIX}abc.train-000000.tar").write_bytes(b"half")
    (tmp_path / "keep.tar").write_bytes(b"x")
    assert fs.remove_stale_temporaries(str(tmp_path)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["keep.tar"]
