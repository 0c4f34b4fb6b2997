"""The whole `kmim run` against object storage: an S3-compatible server (moto) on 127.0.0.1, s3fs."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

RECIPE = str(Path(__file__).resolve().parents[2] / "manifests" / "recipes" / "digits.yaml")
SMALL = [
    "data.shard_size=256",
    "cluster.epochs=2",
    "train.optim.epochs=1",
    "train.data.samples_per_epoch=256",
    "train.checkpoint.every_steps=2",
    "eval.linear.epochs=2",
]


@pytest.fixture()
def s3_env():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "RAY_ADDRESS": "",
        "RAY_TMPDIR": f"/tmp/rs{os.getpid()}",
    }
    try:
        yield env
    finally:
        subprocess.run(["pkill", "-9", "-f", env["RAY_TMPDIR"]], check=False)
        server.stop()


def _kmim(env, *args):
    return subprocess.run(
        [sys.executable, "-m", "kmim", *args], env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_digits_recipe_end_to_end_on_s3(s3_env):
    import s3fs

    s3 = s3fs.S3FileSystem(endpoint_url=s3_env["AWS_ENDPOINT_URL"], key="testing", secret="testing")
    s3.mkdir("kmim-test")
    sets = [a for s in SMALL for a in ("--set", s)]
    first = _kmim(s3_env, "run", RECIPE, "--root", "s3://kmim-test/root", *sets)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "| digits/kmim-pixel-k50 | tokens | 50 |" in first.stdout and "10 ran" in first.stdout
    s3.invalidate_cache()
    stages = {p.rsplit("/", 1)[-1] for p in s3.ls("kmim-test/root")}
    assert {"data", "extract", "cluster", "tokenize", "train", "compare", "runs"} <= stages
    [tokens] = s3.ls("kmim-test/root/tokenize")
    manifest = json.loads(s3.cat_file(f"{tokens}/manifest.json"))
    assert manifest["stats"]["samples"] == 1438 and 0 < manifest["stats"]["tcas"] <= 1
    assert not [p for p in s3.find("kmim-test/root") if "/_tmp." in p]  # no temporaries left behind
    trained = s3.ls("kmim-test/root/train")
    assert len(trained) == 2 and all(s3.exists(f"{t}/eval-linear.json") for t in trained)

    again = _kmim(s3_env, "run", RECIPE, "--root", "s3://kmim-test/root", *sets)
    assert again.returncode == 0 and "10 reused" in again.stdout, again.stderr[-3000:]
    listing = _kmim(s3_env, "ls", "--root", "s3://kmim-test/root")
    assert listing.returncode == 0 and listing.stdout.count("finished") == 6, listing.stdout
