"""`kmim submit -- kmim ...` and `kmim jobs status|logs|stop|list`: kmim commands as Ray jobs."""

from __future__ import annotations

from datetime import datetime
from typing import Optional

import typer

ADDRESS_HELP = "Ray job server (the dashboard address), default $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS or http://127.0.0.1:8265."
TOKEN_HELP = (
    "File holding the cluster's auth token (RAY_AUTH_MODE=token clusters); default $RAY_AUTH_TOKEN, "
    "$RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, sent only when the cluster asks for a token."
)

jobs_app = typer.Typer(
    help="Ray jobs submitted with `kmim submit`: status, logs, stop, list.", no_args_is_help=True
)


def _follow(client, job_id: str) -> None:
    """Streams the logs, prints the final status and exits 0 only for SUCCEEDED."""
    from kmim import jobs

    try:
        info = jobs.follow(client, job_id)
    except KeyboardInterrupt:
        typer.echo(
            f"\nstopped following; job {job_id} goes on (stop it with `kmim jobs stop {job_id}`)", err=True
        )
        raise typer.Exit(130) from None
    typer.echo(jobs.describe(info), err=True)
    raise typer.Exit(jobs.exit_code(info))


def submit(
    command: Optional[list[str]] = typer.Argument(
        None, help="The kmim command line, after `--`.", show_default=False
    ),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
    working_dir: str = typer.Option(
        ".", help="Folder uploaded as the job's working dir (outputs, .venv, .git, caches excluded)."
    ),
    no_working_dir: bool = typer.Option(
        False, "--no-working-dir", help="Upload nothing: run in the head's installed kmim."
    ),
    exclude: Optional[list[str]] = typer.Option(
        None, "--exclude", help="More working-dir excludes (gitignore syntax); repeatable."
    ),
    pip: Optional[list[str]] = typer.Option(
        None, "--pip", help="pip requirement installed for the job; repeatable."
    ),
    env: Optional[list[str]] = typer.Option(
        None, "--env", help="KEY=VALUE environment variable of the job; repeatable."
    ),
    job_id: Optional[str] = typer.Option(None, "--job-id", help="Submission id (default: one made by Ray)."),
    num_cpus: Optional[float] = typer.Option(
        None, "--entrypoint-num-cpus", help="CPUs reserved for the driver."
    ),
    num_gpus: Optional[float] = typer.Option(
        None, "--entrypoint-num-gpus", help="GPUs reserved for the driver."
    ),
    follow: bool = typer.Option(
        False, "--follow", "-f", help="Stream the logs until the job ends; exit 0 only if it succeeded."
    ),
    token_file: Optional[str] = typer.Option(None, help=TOKEN_HELP),
    any_command: bool = typer.Option(
        False, "--any-command", help="Allow an entrypoint that is not a kmim command."
    ),
) -> None:
    """Run a kmim command on a Ray cluster as a Ray job: `kmim submit [OPTIONS] -- kmim run RECIPE.yaml`."""
    from kmim import jobs

    config = jobs.SubmitConfig(
        command=tuple(command or ()),
        working_dir=None if no_working_dir else working_dir,
        excludes=tuple(exclude or ()),
        pip=tuple(pip or ()),
        env_vars=jobs.parse_env_vars(env or ()),
        job_id=job_id,
        any_command=any_command,
        entrypoint_num_cpus=num_cpus,
        entrypoint_num_gpus=num_gpus,
    )
    client = jobs.connect(address, token_file)
    submitted = jobs.submit(client, config)
    typer.echo(submitted)
    typer.echo(f"submitted to {jobs.resolve_address(address)}: {config.entrypoint}", err=True)
    if follow:
        _follow(client, submitted)
    typer.echo(f"follow it with: kmim jobs logs {submitted} --follow", err=True)


@jobs_app.command("status")
def status(
    job_id: str = typer.Argument(..., help="The job id printed by `kmim submit`."),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
    token_file: Optional[str] = typer.Option(None, help=TOKEN_HELP),
) -> None:
    """The job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED) and Ray's message."""
    from kmim import jobs

    typer.echo(jobs.describe(jobs.status(jobs.connect(address, token_file), job_id)))


@jobs_app.command("logs")
def logs(
    job_id: str = typer.Argument(..., help="The job id printed by `kmim submit`."),
    follow: bool = typer.Option(
        False, "--follow", "-f", help="Stream until the job ends; exit 0 only if it succeeded."
    ),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
    token_file: Optional[str] = typer.Option(None, help=TOKEN_HELP),
) -> None:
    """The job's driver logs so far, or streamed to the end with --follow."""
    from kmim import jobs

    client = jobs.connect(address, token_file)
    if follow:
        _follow(client, job_id)
    typer.echo(jobs.logs(client, job_id), nl=False)


@jobs_app.command("stop")
def stop(
    job_id: str = typer.Argument(..., help="The job id printed by `kmim submit`."),
    wait: float = typer.Option(30.0, help="Seconds to wait for the job to end."),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
    token_file: Optional[str] = typer.Option(None, help=TOKEN_HELP),
) -> None:
    """Stop a job (SIGTERM, then SIGKILL after Ray's grace period) and print its final status."""
    from kmim import jobs

    typer.echo(jobs.describe(jobs.stop(jobs.connect(address, token_file), job_id, wait_s=wait)))


@jobs_app.command("list")
def list_(
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
    token_file: Optional[str] = typer.Option(None, help=TOKEN_HELP),
) -> None:
    """Every job on the cluster, oldest first: id, status, start time, entrypoint."""
    from kmim import jobs

    for job in jobs.list_jobs(jobs.connect(address, token_file)):
        start = (
            datetime.fromtimestamp(job.start_time).strftime("%Y-%m-%d %H:%M:%S") if job.start_time else "-"
        )
        typer.echo(f"{job.job_id}\t{job.status}\t{start}\t{job.entrypoint}")
