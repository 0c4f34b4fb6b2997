"""The wheel installs everything under `kmim.` and nothing called `pipeline` or `trainer`."""

import os
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_maps_top_level_folders_under_kmim(tmp_path):
    from setuptools import build_meta

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        name = build_meta.build_wheel(str(tmp_path))
    finally:
        os.chdir(cwd)
    names = zipfile.ZipFile(tmp_path / name).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"kmim", name.split("-")[0] + "-" + name.split("-")[1] + ".dist-info"}
    assert "kmim/pipeline/__init__.py" in names and "kmim/trainer/__init__.py" in names
    assert "kmim/contract/views.py" in names and "kmim/data/reader.py" in names
    # every package folder in the source tree made it into the wheel
    for pkg in ("kmim", "pipeline", "trainer"):
        for init in (ROOT / pkg).rglob("__init__.py"):
            rel = init.relative_to(ROOT).as_posix()
            rel = rel if rel.startswith("kmim/") else "kmim/" + rel
            assert rel in names, f"{rel} missing from the wheel: add its package to pyproject.toml"
