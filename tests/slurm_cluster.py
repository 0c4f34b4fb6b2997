"""A real single-node Slurm (Debian's slurmctld + slurmd + munged) on 127.0.0.1, for tests.

Everything lives under one folder: a private munge key, socket and pid file, a generated slurm.conf (free ports,
`NoCtldInAddrAny,NoInAddrAny` and `NodeAddr=127.0.0.1`, so no daemon listens beyond loopback), state, spool
and logs. Nothing goes to /etc or /run, so a Slurm or munged already on the machine is left alone, and each
daemon is stopped by the pid it wrote. Recipe and traps: ../shared/INFRA.md.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel")
PACKAGES = "slurmctld slurmd slurm-client munge"


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_hardware() -> str:
    """This machine's node line from `slurmd -C`, less its NodeName word (ours is `localhost`)."""
    first = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[
        0
    ]
    return " ".join(word for word in first.split() if not word.startswith(("NodeName=", "UpTime=")))


class SlurmCluster:
    """start() brings up munged, slurmctld and slurmd and waits for the node to be idle; stop() ends them."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        for name in list(self.env):  # a test run inside a Slurm job must not leak that job into ours
            if name.startswith(("SLURM_", "SBATCH_", "SRUN_")) and name != "SLURM_CONF":
                del self.env[name]
        self.pid_files = {
            "slurmd": self.root / "slurmd.pid",
            "slurmctld": self.root / "slurmctld.pid",
            "munged": self.root / "munged.pid",
        }

    def _write_config(self) -> None:
        r = self.root
        for sub in ("state", "spool"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=kmimtest",
                    "SlurmctldHost=localhost(127.0.0.1)",
                    f"SlurmctldPort={_free_port()}",
                    f"SlurmdPort={_free_port()}",
                    "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny",
                    "MailProg=/bin/true",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={r / 'munge.socket'}",
                    f"StateSaveLocation={r / 'state'}",
                    f"SlurmdSpoolDir={r / 'spool'}",
                    f"SlurmctldPidFile={self.pid_files['slurmctld']}",
                    f"SlurmdPidFile={self.pid_files['slurmd']}",
                    f"SlurmctldLogFile={r / 'slurmctld.log'}",
                    f"SlurmdLogFile={r / 'slurmd.log'}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU",  # one task per CPU, whatever the core/thread layout
                    "MpiDefault=none",
                    "ReturnToService=2",
                    "KillWait=5",  # scancel: SIGTERM, then SIGKILL 5 s later
                    "MinJobAge=600",  # a finished job stays visible to scontrol for the test's checks
                    f"NodeName=localhost NodeAddr=127.0.0.1 {_node_hardware()} State=UNKNOWN",
                    "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )

    def start(self, timeout: float = 60) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._write_config()
        key = self.root / "munge.key"
        if not key.exists():
            subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        r = self.root
        subprocess.run(
            [
                "munged",
                "--force",  # root, and a key outside /etc/munge
                f"--socket={r / 'munge.socket'}",
                f"--key-file={key}",
                f"--pid-file={self.pid_files['munged']}",
                f"--log-file={r / 'munged.log'}",
                f"--seed-file={r / 'munged.seed'}",
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(["slurmctld", "-f", str(self.conf)], env=self.env, check=True, capture_output=True)
        subprocess.run(
            ["slurmd", "-f", str(self.conf), "-N", "localhost"], env=self.env, check=True, capture_output=True
        )
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.2)
        raise RuntimeError(f"the Slurm node is {state!r}, not idle, after {timeout} s; logs in {self.root}")

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(cmd), env=self.env, capture_output=True, text=True, check=check, timeout=60
        )

    def sbatch(self, *args: str, env: dict[str, str] | None = None) -> str:
        """Submit; the job id."""
        out = subprocess.run(
            ["sbatch", "--parsable", *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        return out.strip().split(";")[0]

    def job_state(self, job: str) -> str:
        """PENDING, RUNNING, COMPLETED, CANCELLED, FAILED, ... from `scontrol show job`."""
        out = self.run("scontrol", "-o", "show", "job", job).stdout
        fields = dict(word.split("=", 1) for word in out.split() if "=" in word)
        return fields.get("JobState", "UNKNOWN")

    def wait(self, job: str, timeout: float = 300, until=None) -> str:  # noqa: ANN001
        """Poll until the job ends (or `until()` holds); its state then."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job)
            if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING") or (until and until()):
                return state
            time.sleep(0.2)
        raise TimeoutError(f"job {job} still {self.job_state(job)} after {timeout} s")

    def stop(self) -> None:
        """Cancel every job, then end each daemon by the pid it wrote, waiting for it to exit."""
        if self.conf.exists():
            self.run("scancel", "--full", "--user=root", check=False)
        for name in ("slurmd", "slurmctld", "munged"):
            try:
                pid = int(self.pid_files[name].read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
