"""`kmim submit` / `kmim jobs ...` against a real Ray head on 127.0.0.1 with token authentication."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
import typer
from typer.testing import CliRunner

from kmim import jobs
from kmim.cli.jobs import jobs_app, submit
from kmim.errors import ConfigError

pytestmark = pytest.mark.slow

HEAD_START_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_app() -> typer.Typer:
    """The commands as kmim.cli registers them (`kmim submit`, `kmim jobs ...`)."""
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command("submit")(submit)
    app.add_typer(jobs_app, name="jobs")
    app.callback()(lambda: None)
    return app


def _cli(*args: str):
    return CliRunner().invoke(_cli_app(), list(args))


def _head_pids(temp_dir: str, token: str) -> list[int]:
    """Every process of this head: its cmdline names our temp dir, or its environment holds our token."""
    skip = {os.getpid(), os.getppid()}
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in skip:
            continue
        try:
            if (
                temp_dir.encode() in (proc / "cmdline").read_bytes()
                or f"RAY_AUTH_TOKEN={token}".encode() in (proc / "environ").read_bytes()
            ):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def _kill_head(popen: subprocess.Popen, temp_dir: str, token: str) -> None:
    for sig, grace in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 2.0)):
        for pid in _head_pids(temp_dir, token):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while _head_pids(temp_dir, token) and time.monotonic() < deadline:
            time.sleep(0.2)
    popen.wait(timeout=10)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head on loopback only, token auth on, free ports, 2 CPUs; stopped by its own process ids."""
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    token = secrets.token_hex(16)
    dashboard_port = _free_port()
    bindir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        PATH=bindir + os.pathsep + env.get("PATH", ""),  # the jobs' `kmim` is this venv's
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",  # no per-job uv venv: the head runs in this venv
        # `ray start` swaps --node-ip-address=127.0.0.1 for the machine's routable address unless
        # clusters are off; with this, every Ray process binds to and advertises 127.0.0.1.
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        AUTOSCALER_METRIC_PORT=str(_free_port()),
        DASHBOARD_METRIC_PORT=str(_free_port()),
        RAY_USAGE_STATS_ENABLED="0",
    )
    cmd = [
        os.path.join(bindir, "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={_free_port()}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        "--num-cpus=2",
        f"--temp-dir={temp_dir}",
        f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        f"--node-manager-port={_free_port()}",
        f"--object-manager-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        "--object-store-memory=200000000",
        "--disable-usage-stats",
    ]
    log_path = tmp_path_factory.mktemp("ray_head") / "ray_start.log"
    with open(log_path, "w") as log_file:
        popen = subprocess.Popen(
            cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while True:
            if popen.poll() is not None:
                pytest.fail(f"ray start exited with {popen.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if (
                    requests.get(
                        f"{address}/api/version", timeout=2, headers={"Authorization": f"Bearer {token}"}
                    ).status_code
                    == 200
                ):
                    break
            except requests.exceptions.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the job server did not answer within {HEAD_START_TIMEOUT_S}s:\n{log_path.read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield {"address": address, "token": token, "temp_dir": temp_dir}
    finally:
        _kill_head(popen, temp_dir, token)
        assert not _head_pids(temp_dir, token)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def with_token(head, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", head["token"])
    return head


@pytest.fixture
def without_token(monkeypatch, tmp_path):
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token either


# --- against the real head ---------------------------------------------------------------------


def test_submit_follow_runs_a_pipeline_stage_on_the_cluster(with_token, synthetic_dir, tmp_path):
    out = tmp_path / "features"
    r = _cli(
        "submit",
        "--address",
        with_token["address"],
        "--no-working-dir",
        "--follow",
        "--",
        "kmim",
        "pipeline",
        "extract",
        str(synthetic_dir / "train-000000.tar"),
        str(out),
        "--image-size",
        "32",
        "--patch-size",
        "4",
    )
    assert r.exit_code == 0, r.output
    job_id = r.stdout.splitlines()[0]
    assert job_id.startswith("raysubmit_")
    # the stage's summary line, streamed from the driver
    assert re.search(r"^extract: 15 images -> 960 patch features \(dim 48\)", r.stdout, re.MULTILINE)
    assert "Connecting to existing Ray cluster" in r.stdout  # the driver joined this head via RAY_ADDRESS
    assert f"job {job_id}: SUCCEEDED" in r.output
    assert (out / "manifest.json").is_file()
    client = jobs.connect(with_token["address"])
    assert jobs.status(client, job_id).status == "SUCCEEDED"
    assert "patch features (dim 48)" in jobs.logs(client, job_id)
    listed = _cli("jobs", "list", "--address", with_token["address"])
    assert listed.exit_code == 0 and f"{job_id}\tSUCCEEDED" in listed.output


def test_a_failing_job_exits_non_zero_with_status_failed_and_sees_its_working_dir(with_token, tmp_path):
    (tmp_path / "recipe.yaml").write_text("marker: 7\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "big.bin").write_bytes(b"x")
    job_id = f"kmim-test-{secrets.token_hex(4)}"
    r = _cli(
        "submit",
        "--address",
        with_token["address"],
        "--working-dir",
        str(tmp_path),
        "--env",
        "KMIM_T=v=1",
        "--job-id",
        job_id,
        "--any-command",
        "--follow",
        "--",
        "sh",
        "-c",
        'cat recipe.yaml; ls -R; echo "env=$KMIM_T"; exit 3',
    )
    assert r.exit_code == 1, r.output
    assert r.stdout.splitlines()[0] == job_id
    assert f"job {job_id}: FAILED (Job entrypoint command failed with exit code 3" in r.output
    assert "marker: 7" in r.stdout and "env=v=1" in r.stdout  # the working dir and env vars arrived
    assert "big.bin" not in r.stdout  # outputs are not uploaded
    status = _cli("jobs", "status", job_id, "--address", with_token["address"])
    assert status.exit_code == 0 and f"job {job_id}: FAILED" in status.output
    again = _cli("jobs", "logs", job_id, "--follow", "--address", with_token["address"])
    assert again.exit_code == 1 and "marker: 7" in again.stdout


def test_the_cluster_refuses_clients_without_the_token(head, without_token, tmp_path):
    # Ray itself enforces it on the Jobs API: 401 without a token, 403 with a wrong one.
    assert requests.get(f"{head['address']}/api/jobs/", timeout=10).status_code == 401
    assert (
        requests.get(
            f"{head['address']}/api/jobs/", timeout=10, headers={"Authorization": "Bearer wrong"}
        ).status_code
        == 403
    )
    with pytest.raises(jobs.AuthError, match="requires a Ray auth token .* none was found"):
        jobs.connect(head["address"])
    r = _cli("submit", "--address", head["address"], "--no-working-dir", "--", "kmim", "--version")
    assert isinstance(r.exception, jobs.AuthError)
    bad = tmp_path / "token"
    bad.write_text("not-the-token\n")
    with pytest.raises(jobs.AuthError, match="refused the Ray auth token"):
        jobs.connect(head["address"], token_file=str(bad))
    good = tmp_path / "good"
    good.write_text(head["token"] + "\n")
    assert jobs.list_jobs(jobs.connect(head["address"], token_file=str(good))) is not None


def test_stop_ends_a_running_job(with_token):
    client = jobs.connect(with_token["address"])
    job_id = jobs.submit(
        client, jobs.SubmitConfig(command=("sleep", "60"), working_dir=None, any_command=True)
    )
    deadline = time.monotonic() + 30
    while jobs.status(client, job_id).status != "RUNNING":
        assert time.monotonic() < deadline, jobs.status(client, job_id)
        time.sleep(0.3)
    r = _cli("jobs", "stop", job_id, "--address", with_token["address"])
    assert r.exit_code == 0, r.output
    assert f"job {job_id}: STOPPED" in r.output
    assert jobs.status(client, job_id).status == "STOPPED"
    assert jobs.exit_code(jobs.follow(client, job_id, write=lambda _: None)) == 1


def test_unknown_job_id_is_a_clear_error(with_token):
    client = jobs.connect(with_token["address"])
    for call in (jobs.status, jobs.logs, jobs.follow):
        with pytest.raises(jobs.JobNotFoundError, match="no job 'no-such-job'"):
            call(client, "no-such-job")


# --- without a head ------------------------------------------------------------------------------


def test_an_unreachable_address_is_a_clear_error():
    address = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(jobs.ClusterUnreachableError, match=f"cannot reach a Ray job server at {address}"):
        jobs.connect(address)
    r = _cli("jobs", "status", "x", "--address", address)
    assert isinstance(r.exception, jobs.ClusterUnreachableError)
    with pytest.raises(ConfigError, match="dashboard's HTTP address"):
        jobs.connect("ray://127.0.0.1:10001")


def test_submit_config_checks_the_command_and_builds_the_runtime_env(tmp_path):
    with pytest.raises(ConfigError, match="no command"):
        jobs.SubmitConfig(command=())
    with pytest.raises(ConfigError, match="--any-command"):
        jobs.SubmitConfig(command=("python", "x.py"))
    config = jobs.SubmitConfig(
        command=("kmim", "run", "my recipe.yaml", "a=b&&c"),
        working_dir=str(tmp_path),
        excludes=("data/",),
        pip=("rich",),
        env_vars={"A": "1"},
    )
    assert config.entrypoint == "kmim run 'my recipe.yaml' 'a=b&&c'"
    env = config.runtime_env()
    assert (
        env["working_dir"] == str(tmp_path.resolve())
        and env["pip"] == ["rich"]
        and env["env_vars"] == {"A": "1"}
    )
    assert {".venv", ".git", "out", "runs", "__pycache__", "data/"} <= set(env["excludes"])
    assert jobs.SubmitConfig(command=("kmim", "--version"), working_dir=None).runtime_env() == {}
    assert jobs.SubmitConfig(command=("sleep", "1"), any_command=True).command == ("sleep", "1")
    with pytest.raises(ConfigError, match="not a directory"):
        jobs.SubmitConfig(command=("kmim",), working_dir=str(tmp_path / "nope"))
    assert jobs.parse_env_vars(["A=x=y", "B="]) == {"A": "x=y", "B": ""}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        jobs.parse_env_vars(["novalue"])


def test_address_and_token_resolution(monkeypatch, tmp_path):
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert jobs.resolve_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "head:8265")
    assert jobs.resolve_address() == "http://head:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "https://api/")
    assert jobs.resolve_address() == "https://api"
    assert jobs.resolve_address("http://x:1") == "http://x:1"
    assert jobs.resolve_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert jobs.resolve_token() == "from-home"
    (tmp_path / "p").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "p"))
    assert jobs.resolve_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert jobs.resolve_token() == "from-env"
    (tmp_path / "f").write_text(" from-file \n")
    assert jobs.resolve_token(str(tmp_path / "f")) == "from-file"
    with pytest.raises(ConfigError, match="cannot read"):
        jobs.resolve_token(str(tmp_path / "missing"))
