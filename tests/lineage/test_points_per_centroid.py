"""`cluster.points_per_centroid`: `kmim run` sizes the extract sample from K; cluster warns when it is thin."""

import logging

import numpy as np
import pytest

from kmim.errors import ConfigError
from kmim.lineage.recipe import DEFAULT_POINTS_PER_CENTROID, load_recipe, sampled_patches
from kmim.pipeline.cluster import ClusterConfig, cluster
from tests.pipeline.features_helper import write_feature_set

DIGITS = "manifests/recipes/digits.yaml"


def test_sampled_patches_reach_k_times_points_per_centroid():
    assert sampled_patches(50, 256, 1438) == 9  # 9 x 1438 = 12,942 >= 12,800 > 8 x 1438
    assert sampled_patches(50, 256, 60000) == 1
    assert sampled_patches(1024, 256, 60000) == 5
    assert sampled_patches(4096, 256, 1000) == 1049


def test_the_recipe_default_samples_k_times_256_and_explicit_settings_win():
    assert DEFAULT_POINTS_PER_CENTROID == 256
    r = load_recipe(DIGITS, ["cluster.points_per_centroid=256"])
    assert r.points_per_centroid == 256 and r.extract_for(1438).patches_per_image == 9
    assert r.extract_for(None) is r.extract  # image count unknown: every patch, as written
    assert r.extract.patches_per_image is None  # the stage config itself is unchanged
    r = load_recipe(DIGITS, ["cluster.points_per_centroid=256", "cluster.k=2000"])
    assert r.extract_for(1438) is r.extract  # 356 patches per image > 64: every patch
    r = load_recipe(DIGITS, ["cluster.points_per_centroid=256", "extract.patches_per_image=20"])
    assert r.extract_for(1438).patches_per_image == 20
    assert load_recipe(DIGITS).points_per_centroid is None  # the digits recipe says null: every patch
    r = load_recipe(DIGITS, ["cluster.points_per_centroid=null"])
    assert r.extract_for(1438) is r.extract
    unset = load_recipe(DIGITS, ['cluster={"k": 50}'])  # no key at all: the stated default
    assert unset.points_per_centroid == 256


@pytest.mark.parametrize("bad", ["0", "-3", "1.5", "true", '"many"'])
def test_a_bad_points_per_centroid_is_one_config_error(bad):
    with pytest.raises(ConfigError, match=r"cluster.points_per_centroid must be an integer >= 1 or null"):
        load_recipe(DIGITS, [f"cluster.points_per_centroid={bad}"])


@pytest.mark.usefixtures("ray_local")
def test_cluster_warns_naming_the_numbers_below_39_points_per_centroid(tmp_path, caplog):
    x = np.random.default_rng(0).standard_normal((200, 4)).astype(np.float32)
    feats = write_feature_set(str(tmp_path / "f"), [x[:100], x[100:]])
    with caplog.at_level(logging.WARNING, logger="kmim.pipeline.cluster"):
        cluster(feats, str(tmp_path / "c"), ClusterConfig(k=8, epochs=2))  # 25 per centroid
    warned = [r.getMessage() for r in caplog.records if "per centroid" in r.getMessage()]
    assert warned and "200 feature vectors for K = 8 is 25.0 per centroid, fewer than 39" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kmim.pipeline.cluster"):
        cluster(feats, str(tmp_path / "c2"), ClusterConfig(k=5, epochs=2))  # 40 per centroid
    assert not [r for r in caplog.records if "per centroid" in r.getMessage()]
