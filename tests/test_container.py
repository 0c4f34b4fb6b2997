"""docker/build.sh for real (marked `container`, outside the default run: it builds two multi-GB images):
both images build, the CPU image runs the digits pipeline stages and a few training steps, the CUDA image
imports torch and faiss, and the report names sizes and build times. Run: uv run pytest -m container"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VERSION = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)

pytestmark = [
    pytest.mark.container,
    pytest.mark.skipif(
        shutil.which("podman") is None and shutil.which("docker") is None,
        reason="needs podman (apt-get install podman buildah runc debootstrap) or docker",
    ),
]


def test_build_sh_builds_both_images_and_the_cpu_image_runs_the_pipeline():
    work = Path(os.environ.get("KMIM_BUILD_DIR", REPO / "build" / "containers"))  # reuses the image store
    proc = subprocess.run(
        ["bash", "docker/build.sh", "--work", str(work)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads((work / "build-report.json").read_text())
    assert report["smoke"] == {"cpu": "passed", "cuda": "passed", "seconds": report["smoke"]["seconds"]}
    assert set(report["images"]) == {"cpu", "cuda"}
    for kind, image in report["images"].items():
        assert image["tag"] == f"ghcr.io/kmim-project/kmim:{VERSION}-{kind}"
        assert image["size_bytes"] > 1e9 and image["build_seconds"] > 0 and image["largest"]
    summary = json.loads((work / "smoke" / "train" / "train_summary.json").read_text())
    assert summary["steps"] == 256 // 64
    assert "torch" in proc.stdout and "faiss" in proc.stdout
