"""Shared fixtures: small real datasets built in the test, and the `gpu` marker's skip."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
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
