"""`kmim pipeline cluster` on a real local Ray with real faiss."""

import numpy as np
import pytest

from kmim.errors import ConfigError, InputError
from kmim.pipeline.cluster import ClusterConfig, cluster
from kmim.tokenizer import load_codebook
from tests.pipeline.features_helper import blobs, write_feature_set

pytestmark = pytest.mark.usefixtures("ray_local")

TRUE = np.array([[0, 0, 0, 0], [10, 0, 0, 0], [0, 10, 0, 0], [0, 0, 10, 0], [0, 0, 0, 10]], dtype=np.float32)


@pytest.fixture(scope="module")
def blob_features(tmp_path_factory):
    x = blobs(400, TRUE, 0.5, seed=0)
    return write_feature_set(str(tmp_path_factory.mktemp("blobs")), np.array_split(x, 4)), x


def _match(centers, truth):
    return np.sort(np.sqrt(((centers[:, None] - truth[None]) ** 2).sum(-1)).min(0))


@pytest.mark.parametrize("init", ["kmeans++", "kmeans-parallel", "random"])
def test_recovers_the_true_centers_of_separated_blobs(blob_features, tmp_path, init):
    feats, x = blob_features
    result = cluster(feats, str(tmp_path / "c"), ClusterConfig(k=5, epochs=15, init=init, seed=3))
    centers, meta = load_codebook(str(tmp_path / "c"))
    if init == "random":  # Lloyd from random seeds may merge two blobs; it must still lower the inertia
        assert meta["inertia_per_epoch"][-1] <= meta["inertia_per_epoch"][0]
    else:
        assert _match(centers, TRUE).max() < 0.1
        assert sorted(meta["cluster_sizes"]) == [400] * 5
    assert (
        meta["k"] == 5
        and meta["dim"] == 4
        and meta["epochs_run"] == 15
        and len(meta["seconds_per_epoch"]) == 15
    )
    assert meta["extractor"]["name"] == "pixel" and meta["view"]["patch_size"] == 4
    assert (
        result.manifest.stats["points"] == 2000 and not (tmp_path / "c" / "_checkpoint.safetensors").exists()
    )


def test_same_seed_same_codebook_and_two_workers_equal_one(blob_features, tmp_path):
    feats, _ = blob_features
    runs = {}
    for name, workers, seed in [("a", 1, 0), ("b", 1, 0), ("c", 2, 0), ("d", 2, 1)]:
        cluster(feats, str(tmp_path / name), ClusterConfig(k=8, epochs=6, seed=seed, ray_workers=workers))
        runs[name] = load_codebook(str(tmp_path / name))
    assert np.array_equal(runs["a"][0], runs["b"][0])
    assert runs["a"][1]["workers"] == 1 and runs["c"][1]["workers"] == 2
    np.testing.assert_allclose(runs["a"][0], runs["c"][0], rtol=1e-6, atol=1e-6)
    assert runs["a"][1]["cluster_sizes"] == runs["c"][1]["cluster_sizes"]
    assert not np.allclose(runs["a"][0], runs["d"][0])


def test_parallel_init_does_not_depend_on_the_number_of_workers(blob_features, tmp_path):
    feats, _ = blob_features
    for name, workers in [("one", 1), ("two", 2)]:
        cluster(
            feats,
            str(tmp_path / name),
            ClusterConfig(k=5, epochs=1, init="kmeans-parallel", ray_workers=workers),
        )
    np.testing.assert_allclose(
        load_codebook(str(tmp_path / "one"))[0], load_codebook(str(tmp_path / "two"))[0], rtol=1e-5
    )


def test_streamed_equals_in_memory(blob_features, tmp_path):
    feats, _ = blob_features
    cluster(feats, str(tmp_path / "mem"), ClusterConfig(k=5, epochs=4))
    cluster(feats, str(tmp_path / "stream"), ClusterConfig(k=5, epochs=4, memory_per_worker_gb=0.0))
    np.testing.assert_allclose(
        load_codebook(str(tmp_path / "mem"))[0], load_codebook(str(tmp_path / "stream"))[0], rtol=1e-6
    )


def test_spherical_and_minibatch(blob_features, tmp_path):
    feats, _ = blob_features
    cluster(feats, str(tmp_path / "s"), ClusterConfig(k=4, epochs=3, spherical=True))
    centers, _ = load_codebook(str(tmp_path / "s"))
    assert np.allclose(np.linalg.norm(centers, axis=1), 1, atol=1e-5)
    cluster(feats, str(tmp_path / "m"), ClusterConfig(k=5, epochs=3, minibatch=256))
    centers, meta = load_codebook(str(tmp_path / "m"))
    assert _match(centers, TRUE).max() < 0.5 and meta["minibatch"] == 256


def test_empty_clusters_are_reseeded_by_splitting_and_counted(tmp_path):
    x = np.repeat(np.array([[0, 0], [5, 5], [9, 0]], dtype=np.float32), 50, axis=0)
    feats = write_feature_set(str(tmp_path / "f"), [x])
    cluster(feats, str(tmp_path / "c"), ClusterConfig(k=6, epochs=3, init="random", seed=0))
    meta = load_codebook(str(tmp_path / "c"))[1]
    assert meta["empty_cluster_reseeds"] > 0 and sum(meta["cluster_sizes"]) == 150


def test_init_from_given_centers(blob_features, tmp_path):
    from safetensors.numpy import save_file

    feats, _ = blob_features
    save_file({"centers": TRUE + 0.3}, str(tmp_path / "init.safetensors"))
    cluster(
        feats, str(tmp_path / "c"), ClusterConfig(k=5, epochs=2, init_from=str(tmp_path / "init.safetensors"))
    )
    centers, meta = load_codebook(str(tmp_path / "c"))
    assert _match(centers, TRUE).max() < 0.1 and meta["init"].startswith("from ")
    with pytest.raises(InputError, match=r"expected \(6, 4\)"):
        cluster(feats, str(tmp_path / "d"), ClusterConfig(k=6, init_from=str(tmp_path / "c")))


def test_tol_stops_early(blob_features, tmp_path):
    feats, _ = blob_features
    cluster(feats, str(tmp_path / "c"), ClusterConfig(k=5, epochs=50, tol=1e-4))
    meta = load_codebook(str(tmp_path / "c"))[1]
    assert meta["stopped_early"] and meta["epochs_run"] < 50


def test_bad_inputs_are_clear_errors_before_any_work(tmp_path):
    good = np.ones((10, 3), np.float32)
    nan = good.copy()
    nan[7, 1] = np.nan
    with pytest.raises(
        InputError, match=r"part-000001\.arrow: 1 feature vectors hold NaN or Inf \(first at row 7\)"
    ):
        cluster(
            write_feature_set(str(tmp_path / "nan"), [good, nan]), str(tmp_path / "o1"), ClusterConfig(k=2)
        )
    with pytest.raises(InputError, match="k = 30 is larger than the number of feature vectors"):
        cluster(
            write_feature_set(str(tmp_path / "few"), [good, good]), str(tmp_path / "o2"), ClusterConfig(k=30)
        )
    mixed = write_feature_set(str(tmp_path / "mixed"), [good, np.ones((4, 5), np.float32)])
    with pytest.raises(InputError, match="mixed feature dims"):
        cluster(mixed, str(tmp_path / "o3"), ClusterConfig(k=2))
    with pytest.raises(InputError, match="empty feature set"):
        cluster(
            write_feature_set(str(tmp_path / "empty"), [np.zeros((0, 3), np.float32)]),
            str(tmp_path / "o4"),
            ClusterConfig(k=2),
        )
    with pytest.raises(InputError, match="not a finished `kmim pipeline extract` output"):
        cluster(str(tmp_path), str(tmp_path / "o5"), ClusterConfig(k=2))
    with pytest.raises(ConfigError):
        ClusterConfig(k=2, init="kmedoids")
    assert not any((tmp_path / o / "codebook.json").exists() for o in ("o1", "o2", "o3", "o4"))


def _variable_length_table():
    import pyarrow as pa

    return pa.table(
        {
            "key": ["a", "b"],
            "label": pa.array([None, None], pa.int32()),
            "patch": [0, 0],
            "feature": pa.array([[1.0, 2.0], [1.0]], pa.list_(pa.float32())),
        }
    )


def test_a_variable_length_feature_column_is_one_line_naming_the_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kmim.pipeline.features import open_features

    # version 1 (Parquet)
    out = write_feature_set(str(tmp_path / "f"), [np.ones((10, 3), np.float32)], format_version=1)
    pq.write_table(_variable_length_table(), str(tmp_path / "f" / "part-000000.parquet"))
    with pytest.raises(
        InputError, match=r"part-000000\.parquet: column 'feature' is list<.*float>, expected"
    ):
        open_features(out)
    # version 2 (Arrow IPC)
    out = write_feature_set(str(tmp_path / "g"), [np.ones((10, 3), np.float32)])
    table = _variable_length_table()
    with pa.ipc.new_file(str(tmp_path / "g" / "part-000000.arrow"), table.schema) as writer:
        writer.write_table(table)
    with pytest.raises(InputError, match=r"part-000000\.arrow: column 'feature' is list<.*float>, expected"):
        open_features(out)


def test_a_missing_or_foreign_feature_file_is_one_line_naming_the_file(tmp_path):
    from kmim.pipeline.features import open_features

    out = write_feature_set(str(tmp_path / "f"), [np.ones((10, 3), np.float32)] * 2)
    (tmp_path / "f" / "part-000001.arrow").write_bytes(b"not features at all")
    with pytest.raises(
        InputError, match=r"part-000001\.arrow: missing or not a feature file \(NotAFeatureFile"
    ):
        open_features(out)
    (tmp_path / "f" / "part-000001.arrow").unlink()
    with pytest.raises(InputError, match=r"part-000001\.arrow: missing or not a feature file \(FileNotFound"):
        open_features(out)


def test_version_1_parquet_features_still_cluster_to_the_same_codebook(tmp_path):
    from kmim.pipeline.features import open_features, read_feature_file

    x = blobs(300, TRUE, 0.5, seed=1)
    parts = np.array_split(x, 3)
    v1 = write_feature_set(str(tmp_path / "v1"), parts, dtype="float16", format_version=1)
    v2 = write_feature_set(str(tmp_path / "v2"), parts, dtype="float16")
    assert sorted(p.name for p in (tmp_path / "v1").glob("part-*")) == [
        f"part-00000{i}.parquet" for i in range(3)
    ]
    assert (tmp_path / "v1" / "part-000000.parquet").read_bytes()[:4] == b"PAR1"
    assert (tmp_path / "v2" / "part-000000.arrow").read_bytes()[:6] == b"ARROW1"
    f1, f2 = open_features(v1), open_features(v2)
    assert f1.dim == f2.dim == 4 and f1.rows == f2.rows == 1500
    for a, b in zip(f1.files, f2.files):
        np.testing.assert_array_equal(read_feature_file(a.url, 4), read_feature_file(b.url, 4))
    config = ClusterConfig(k=5, epochs=5, seed=2)
    for name, feats in (("c1", v1), ("c2", v2)):
        cluster(feats, str(tmp_path / name), config)
    (c1, m1), (c2, m2) = load_codebook(str(tmp_path / "c1")), load_codebook(str(tmp_path / "c2"))
    assert np.array_equal(c1, c2) and m1["cluster_sizes"] == m2["cluster_sizes"]
    assert m1["inertia_per_epoch"] == m2["inertia_per_epoch"]
