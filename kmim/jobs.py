"""Run kmim commands on a Ray cluster through the Ray Jobs API: submit, follow, status, stop, list.

The job's entrypoint is a `kmim` command line (shell-quoted); its driver runs on the head node, where
Ray sets RAY_ADDRESS, so every pipeline stage joins the cluster it runs on (`ray_runtime.ray_session`).
The runtime env ships the working directory (recipes, configs; the code is the head's installed kmim)
minus outputs, environments and caches, plus optional pip packages and environment variables.

Token authentication (Ray >= 2.52, RAY_AUTH_MODE=token on the cluster): the job server answers 401
without an `Authorization: Bearer <token>` header and 403 with a wrong one. We probe the server first
and send a token only when it asks for one, read from `--token-file`, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH
or ~/.ray/auth_token (Ray's own order). Ray's SDK adds the header by itself only when the *client*
process has RAY_AUTH_MODE=token, which a laptop talking to a remote cluster usually does not.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kmim.errors import ConfigError, KmimError

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never uploaded with the working dir: environments, run outputs, VCS data and caches.
WORKING_DIR_EXCLUDES = (
    ".venv",
    "venv",
    ".git",
    "out",
    "runs",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    "*.egg-info",
    ".ipynb_checkpoints",
    "*.pyc",
)
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
PROBE_TIMEOUT_S = 10.0
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class JobsError(KmimError):
    """A Jobs API request that cannot be done; the message says which address or job and why."""


class ClusterUnreachableError(JobsError):
    """Nothing answers at the address, or it is not a Ray job server."""


class AuthError(JobsError):
    """The cluster requires a token and none was found (401), or it refused the one sent (403)."""


class JobNotFoundError(JobsError):
    """The cluster has no job with this id."""


@dataclass(frozen=True)
class SubmitConfig:
    """One job: the kmim command line and the runtime env it runs in."""

    command: tuple[str, ...]
    working_dir: str | None = "."  # uploaded to the cluster; None: only what the head has installed
    excludes: tuple[str, ...] = ()  # added to WORKING_DIR_EXCLUDES (gitignore syntax)
    pip: tuple[str, ...] = ()
    env_vars: dict[str, str] = field(default_factory=dict)
    job_id: str | None = None  # Ray's submission id; Ray makes one when None
    any_command: bool = False  # allow an entrypoint that is not a kmim command
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "command", tuple(self.command))
        if not self.command or not self.command[0].strip():
            raise ConfigError(
                "no command to submit: put it after `--`, e.g. `kmim submit -- kmim run RECIPE.yaml`"
            )
        if not self.any_command and Path(self.command[0]).name != "kmim":
            raise ConfigError(
                f"the command starts with {self.command[0]!r}, not `kmim`; "
                "pass --any-command to submit it anyway"
            )
        if self.working_dir is not None and not Path(self.working_dir).is_dir():
            raise ConfigError(f"--working-dir {self.working_dir}: not a directory")
        for key in self.env_vars:
            if not _ENV_KEY.fullmatch(key):
                raise ConfigError(f"environment variable name {key!r} is not valid")
        for name in ("entrypoint_num_cpus", "entrypoint_num_gpus"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")

    @property
    def entrypoint(self) -> str:
        return shlex.join(self.command)

    def runtime_env(self) -> dict:
        env: dict = {}
        if self.working_dir is not None:
            env["working_dir"] = str(Path(self.working_dir).resolve())
            env["excludes"] = list(dict.fromkeys(WORKING_DIR_EXCLUDES + tuple(self.excludes)))
        if self.pip:
            env["pip"] = list(self.pip)
        if self.env_vars:
            env["env_vars"] = dict(self.env_vars)
        return env


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    status: str
    message: str
    entrypoint: str
    start_time: float | None  # seconds since the epoch
    end_time: float | None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


def parse_env_vars(pairs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """`KEY=VALUE` strings into a dict (the value may contain `=`)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def resolve_address(address: str | None = None) -> str:
    """--address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else http://127.0.0.1:8265; `host:port` gets http://."""
    address = (
        address
        or os.environ.get("RAY_API_SERVER_ADDRESS")
        or os.environ.get("RAY_ADDRESS")
        or DEFAULT_ADDRESS
    )
    address = address.strip().rstrip("/")
    if "://" not in address:
        address = "http://" + address
    scheme = address.split("://", 1)[0]
    if scheme not in ("http", "https"):
        raise ConfigError(
            f"Ray address {address}: the Jobs API is the dashboard's HTTP address, e.g. http://HEAD:8265"
        )
    return address


def resolve_token(token_file: str | None = None) -> str | None:
    """The token to send: --token-file, else RAY_AUTH_TOKEN, else RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    if token_file:
        return _read_token(token_file, "--token-file")
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return _read_token(os.environ["RAY_AUTH_TOKEN_PATH"], "RAY_AUTH_TOKEN_PATH")
    default = Path.home() / ".ray" / "auth_token"
    return _read_token(str(default), str(default)) if default.is_file() else None


def _read_token(path: str, what: str) -> str:
    try:
        token = Path(path).expanduser().read_text().strip()
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot read the token ({e.strerror or e})") from None
    if not token:
        raise ConfigError(f"{what} {path}: the file is empty")
    return token


def _probe(address: str, headers: dict[str, str]) -> int:
    """HTTP status of the job server's version endpoint; raises when nothing (or no Ray) answers."""
    import requests

    try:
        r = requests.get(f"{address}/api/version", headers=headers, timeout=PROBE_TIMEOUT_S)
    except requests.exceptions.RequestException as e:
        raise ClusterUnreachableError(
            f"cannot reach a Ray job server at {address} ({type(e).__name__}); "
            "is the head running with its dashboard, and is this its dashboard port?"
        ) from None
    if r.status_code == 200:
        try:
            r.json()["ray_version"]
        except (ValueError, KeyError, TypeError):
            raise ClusterUnreachableError(f"{address} answers, but not as a Ray job server") from None
    elif r.status_code not in (401, 403):
        raise ClusterUnreachableError(
            f"{address}/api/version answered HTTP {r.status_code}; not a Ray job server?"
        )
    return r.status_code


def connect(
    address: str | None = None, token_file: str | None = None, token: str | None = None
) -> JobSubmissionClient:
    """A Jobs API client for the cluster, with the auth header when (and only when) the cluster asks for one."""
    address = resolve_address(address)
    headers: dict[str, str] = {}
    if _probe(address, headers) != 200:
        token = token or resolve_token(token_file)
        if token is None:
            raise AuthError(
                f"{address} requires a Ray auth token (RAY_AUTH_MODE=token) and none was found: "
                "set RAY_AUTH_TOKEN or pass --token-file"
            )
        headers = {"Authorization": f"Bearer {token}"}
        code = _probe(address, headers)
        if code != 200:
            raise AuthError(
                f"{address} refused the Ray auth token (HTTP {code}): it is not this cluster's token"
            )
    from ray.job_submission import JobSubmissionClient

    with _translated(address):
        return JobSubmissionClient(address, headers=headers or None)


class _translated:
    """Turns the SDK's exceptions (RuntimeError with an HTTP status, AuthenticationError, ...) into JobsErrors."""

    def __init__(self, address: str, job_id: str | None = None):
        self.address, self.job_id = address, job_id

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, KmimError) or not isinstance(exc, Exception):
            return False
        import requests
        from ray.exceptions import AuthenticationError

        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, AuthenticationError):
            raise AuthError(f"{self.address}: {first}") from None
        network = (ConnectionError, requests.exceptions.RequestException)
        if isinstance(exc, network) or type(exc).__module__.startswith("aiohttp"):
            raise ClusterUnreachableError(f"lost the Ray job server at {self.address}: {first}") from None
        if isinstance(exc, RuntimeError) and "status code 404" in first:
            raise JobNotFoundError(f"no job {self.job_id!r} on the cluster at {self.address}") from None
        if isinstance(exc, (RuntimeError, ValueError)):
            what = f"job {self.job_id}" if self.job_id else self.address
            raise JobsError(f"{what}: {first}") from None
        return False


def _address(client: JobSubmissionClient) -> str:
    return getattr(client, "_address", "the Ray cluster")


def submit(client: JobSubmissionClient, config: SubmitConfig) -> str:
    """Submits the job (uploading the working dir if any); returns its id at once."""
    with _translated(_address(client), config.job_id):
        return client.submit_job(
            entrypoint=config.entrypoint,
            submission_id=config.job_id,
            runtime_env=config.runtime_env() or None,
            entrypoint_num_cpus=config.entrypoint_num_cpus,
            entrypoint_num_gpus=config.entrypoint_num_gpus,
        )


def _seconds(ms: int | None) -> float | None:
    return ms / 1000.0 if ms else None  # Ray reports milliseconds


def _info(details) -> JobInfo:
    status = getattr(details.status, "value", details.status)
    return JobInfo(
        job_id=details.submission_id or details.job_id,
        status=str(status),
        message=details.message or "",
        entrypoint=details.entrypoint or "",
        start_time=_seconds(details.start_time),
        end_time=_seconds(details.end_time),
    )


def status(client: JobSubmissionClient, job_id: str) -> JobInfo:
    with _translated(_address(client), job_id):
        return _info(client.get_job_info(job_id))


def logs(client: JobSubmissionClient, job_id: str) -> str:
    """Everything the job's driver has printed so far."""
    with _translated(_address(client), job_id):
        return client.get_job_logs(job_id)


def stop(client: JobSubmissionClient, job_id: str, wait_s: float = 30.0) -> JobInfo:
    """Asks the job to stop (SIGTERM, then SIGKILL from Ray) and waits up to `wait_s` for a final status."""
    with _translated(_address(client), job_id):
        client.stop_job(job_id)
    return wait(client, job_id, timeout_s=wait_s)


def list_jobs(client: JobSubmissionClient) -> list[JobInfo]:
    """Every job the cluster knows, oldest first."""
    with _translated(_address(client)):
        jobs = [_info(d) for d in client.list_jobs()]
    return sorted(jobs, key=lambda j: j.start_time or 0.0)


def wait(
    client: JobSubmissionClient, job_id: str, timeout_s: float | None = None, poll_s: float = 0.5
) -> JobInfo:
    """Polls until the job is finished (or `timeout_s` passes); returns the last status seen."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        info = status(client, job_id)
        if info.finished or (deadline is not None and time.monotonic() > deadline):
            return info
        time.sleep(poll_s)


def _stdout(chunk: str) -> None:
    sys.stdout.write(chunk)
    sys.stdout.flush()


def follow(
    client: JobSubmissionClient, job_id: str, write: Callable[[str], None] = _stdout, poll_s: float = 1.0
) -> JobInfo:
    """Streams the job's logs to `write` until the job ends; returns its final status.

    Uses the job server's log websocket; where that breaks (a proxy without websockets, a dropped
    connection) it goes on by polling the full logs and writing what is new.
    """
    status(client, job_id)  # an unknown id fails here, with a clear error
    written = 0

    def out(chunk: str) -> None:
        nonlocal written
        written += len(chunk)
        write(chunk)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out(chunk)

    sdk_log = logging.getLogger("ray.dashboard.modules.job.sdk")
    level = sdk_log.level
    sdk_log.setLevel(logging.WARNING)  # it logs every websocket close at INFO
    try:
        with warnings.catch_warnings():  # the SDK's websocket call trips an aiohttp deprecation warning
            warnings.simplefilter("ignore", DeprecationWarning)
            asyncio.run(tail())
        streamed = True
    except Exception as e:  # noqa: BLE001 - any streaming failure falls back to polling
        log.warning("log stream of job %s broke (%s: %s); polling instead", job_id, type(e).__name__, e)
        streamed = False
    finally:
        sdk_log.setLevel(level)
    if streamed:  # the server closes the stream once the job has ended
        info = status(client, job_id)
        if info.finished:
            return info
        log.warning("log stream of job %s closed while it is %s; polling instead", job_id, info.status)
    while True:
        info = status(client, job_id)
        text = logs(client, job_id)
        if len(text) > written:
            out(text[written:])
        if info.finished:
            return info
        time.sleep(poll_s)


def exit_code(info: JobInfo) -> int:
    """0 for SUCCEEDED, 1 for anything else (FAILED, STOPPED, still running)."""
    return 0 if info.status == "SUCCEEDED" else 1


def describe(info: JobInfo) -> str:
    """One line: `job ID: STATUS (Ray's message without the last logs it may append)`."""
    message = info.message.strip().splitlines()[0] if info.message.strip() else ""
    message = message.split(", last available logs")[0].rstrip(":, ")
    return f"job {info.job_id}: {info.status}" + (f" ({message})" if message else "")
