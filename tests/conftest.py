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
