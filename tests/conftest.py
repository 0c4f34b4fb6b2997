"""Shared fixtures: small real datasets built in the test, and the `gpu` marker's skip."""

from __future__ import annotations

import pytest
import torch

# The longest test files first (seconds on an idle 2-core machine, from --durations): `pytest -n N --dist
# loadfile` hands files to workers in collection order, so the long ones start at once instead of last
# (longest-first keeps the whole run near its CPU time / N).
LONGEST_FIRST = (
    "tests/lineage/test_fault_drills.py",  # ~320 s
    "tests/test_slurm.py",  # ~220 s
    "tests/test_gpu_check.py",  # ~180 s
    "tests/lineage/test_object_storage.py",  # ~165 s
    "tests/pipeline/test_grid_views.py",  # ~150 s
    "tests/trainer/test_train.py",  # ~200 s
    "tests/trainer/test_finetune.py",  # ~110 s
    "tests/lineage/test_run.py",  # ~100 s
)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: order kept within
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """The real digits dataset written once per session by `write_digits` (1,797 samples, 8 shards)."""
    from kmim.data.digits import write_digits

    out = tmp_path_factory.mktemp("digits")
    write_digits(str(out))
    return out


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray on 127.0.0.1 with 2 CPUs for the whole session; stages reuse it."""
    from kmim.pipeline.ray_runtime import ray_session

    with ray_session(num_cpus=2) as resources:
        yield resources


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """60 synthetic 32x32 images with labels, 5 classes, in 4 shards of 15."""
    from kmim.data.synthetic import SyntheticConfig, write_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic(str(out), SyntheticConfig(num_images=60, image_size=32, classes=5, shard_size=15))
    return out


@pytest.fixture(scope="session")
def digits_tokens(digits_dir, ray_local, tmp_path_factory):
    """digits -> pixel features (32 px, patch 4) -> K=16 codebook -> token shards with 2 views."""
    from kmim.pipeline.cluster import ClusterConfig, cluster
    from kmim.pipeline.extract import ExtractConfig, extract
    from kmim.pipeline.tokenize import TokenizeConfig, tokenize

    root = tmp_path_factory.mktemp("digits_tokens")
    extract(
        str(digits_dir / "train.shards.json"),
        str(root / "features"),
        ExtractConfig(image_size=32, patch_size=4, patches_per_image=16, dtype="float32"),
    )
    cluster(str(root / "features"), str(root / "codebook"), ClusterConfig(k=16, epochs=3))
    tokenize(str(digits_dir), str(root / "tokens"), str(root / "codebook"), TokenizeConfig(views=2))
    return root
