"""The `kmim` command line: thin typer commands over the importable functions of the package."""

from __future__ import annotations

import logging
import sys

import typer

from kmim import __version__
from kmim.cli.data import data_app
from kmim.cli.eval import eval_app
from kmim.cli.jobs import jobs_app, submit
from kmim.cli.pipeline import pipeline_app
from kmim.cli.run import ls, run, show
from kmim.cli.theory import theory_app
from kmim.cli.train import export, train
from kmim.errors import KmimError

app = typer.Typer(
    name="kmim",
    help="K-MIM at scale: K-means discrete tokens for masked image modeling.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data_app, name="data")
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(eval_app, name="eval")
app.add_typer(theory_app, name="theory")
app.add_typer(jobs_app, name="jobs")
app.command("run")(run)
app.command("ls")(ls)
app.command("show")(show)
app.command("submit")(submit)
app.command("train")(train)
app.command("export")(export)


@app.command("verify")
def verify(
    path: str = typer.Argument(
        ..., help="A dataset or stage folder (shards.json / manifest.json) or a `kmim run` root."
    ),
) -> None:
    """Check every shard and output file against the sizes and sha256 its index and manifest recorded; run it
    after copying shards between stores. Exits 1 when a file is missing or changed."""
    import json

    from kmim.verify import verify as run

    report = run(path)
    for p in report.problems:
        typer.echo(f"{p['file']}: {p['reason']}", err=True)
    typer.echo(
        json.dumps(report.to_json())
        if report.problems
        else f"verify: {report.checked} files, {report.bytes:,} bytes: all match their recorded size and sha256"
    )
    if not report.ok:
        raise typer.Exit(1)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kmim {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:  # faiss logs every CPU-feature probe at INFO
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def main() -> None:
    """Entry point: user-facing errors print as one line and exit 2, without a traceback."""
    try:
        app()
    except KmimError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)
