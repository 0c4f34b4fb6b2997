"""One writer per output root: a second one is refused naming the holder; a dead holder's lock is taken over."""

import json
import os
import socket
import subprocess
import sys

import pytest

from kmim.lock import LOCK_NAME, LockedError, output_lock

HOLD = """
import sys, time
from kmim.lock import output_lock
with output_lock(sys.argv[1], "holder test"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(
            LockedError, match=rf"in use by holder test \(pid {holder.pid} on {socket.gethostname()} since"
        ):
            with output_lock(str(tmp_path), "second"):
                pass
    finally:
        holder.kill()
        holder.wait()
    # its process is gone (SIGKILL: the lock file stayed): the next writer takes the lock over
    assert (tmp_path / LOCK_NAME).exists()
    with output_lock(str(tmp_path), "third"):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()


def test_children_of_the_holder_pass(tmp_path):
    with output_lock(str(tmp_path), "parent"):
        child = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys\nfrom kmim.lock import output_lock\n"
                "with output_lock(sys.argv[1], 'child'):\n    print('in')",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert child.returncode == 0 and child.stdout.strip() == "in", child.stderr
        assert json.loads((tmp_path / LOCK_NAME).read_text())["what"] == "parent"


def test_a_second_kmim_run_on_one_root_is_refused(tmp_path):
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "manifests" / "recipes" / "digits.yaml"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run(
            [sys.executable, "-m", "kmim", "run", str(recipe), "--root", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 2 and f"in use by holder test (pid {holder.pid}" in second.stderr
    assert not (tmp_path / "data").exists()  # refused before any stage


def test_a_second_writer_of_one_stage_folder_is_refused(tmp_path):
    from kmim.pipeline.configs import ClusterConfig
    from kmim.pipeline.stage import claim_output

    first = claim_output(str(tmp_path), "cluster", ClusterConfig(k=2), [])
    holder = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys\nfrom kmim.pipeline.configs import ClusterConfig\n"
            "from kmim.pipeline.stage import claim_output\n"
            "claim_output(sys.argv[1], 'cluster', ClusterConfig(k=2), [])",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "KMIM_LOCK_IDS"},
    )  # not our child
    assert holder.returncode != 0 and f"in use by kmim pipeline cluster (pid {os.getpid()}" in holder.stderr
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
