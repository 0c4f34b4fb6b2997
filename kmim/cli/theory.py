"""`kmim theory ...`: the paper's theory, computed numerically and checked against its closed forms."""

from __future__ import annotations

import typer

from kmim.cli.options import config_options
from kmim.theory.toy import ToyConfig

theory_app = typer.Typer(
    help="Check the paper's theory numerically (the toy model of section 3.3).", no_args_is_help=True
)


@theory_app.callback()
def _group() -> None:
    """Check the paper's theory numerically."""
    # A callback keeps `theory` a group: typer would otherwise collapse a one-command app into that command.


@theory_app.command("toy")
@config_options(ToyConfig, where="toy")
def toy(
    json_path: str | None = typer.Option(None, "--json", help="Also write the report as JSON here."),
    config: ToyConfig = None,  # type: ignore[assignment]  # built from the options by config_options
) -> None:
    """Toy model: numerics vs the paper's closed forms, and Theorem 1 against random partitions.

    Prints the table; exits 1 when a closed form disagrees or the Theorem 1 check fails.
    """
    from kmim import fs
    from kmim.theory.toy import render, toy_report

    report = toy_report(config)
    if json_path:
        fs.write_json_atomic(json_path, report)
    typer.echo(render(report))
    if not report["ok"]:
        raise typer.Exit(1)
