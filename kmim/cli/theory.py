"""`kmim theory ...`: the paper's theory, computed numerically and checked against its closed forms."""

from __future__ import annotations

import typer

theory_app = typer.Typer(help="Check the paper's theory numerically (the toy model of section 3.3).",
                         no_args_is_help=True)


@theory_app.callback()
def _group() -> None:
    """Check the paper's theory numerically."""
    # A callback keeps `theory` a group: typer would otherwise collapse a one-command app into that command.


@theory_app.command("toy")
def toy(
    n: int = typer.Option(8, "--n", help="Points per class."),
    m: int = typer.Option(2, "--m", help="Points shared by every two classes (t = m/n)."),
    classes: int = typer.Option(2, "--classes", help="Classes S (2: section 3.3; more: appendix C)."),
    tokenizer: str = typer.Option("class", "--tokenizer", help="mae (one token per point), class, or cross."),
    l: int | None = typer.Option(None, "--l", help="Cross-class tokens (cross only; default 2)."),
    partitions: int = typer.Option(200, "--partitions", help="Random partitions for Theorem 1 (0: skip)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random partitions."),
    json_path: str | None = typer.Option(None, "--json", help="Also write the report as JSON here."),
) -> None:
    """Toy model: numerics vs the paper's closed forms, and Theorem 1 against random partitions.

    Prints the table; exits 1 when a closed form disagrees or the Theorem 1 check fails.
    """
    from kmim import fs
    from kmim.theory.toy import ToyConfig, render, toy_report

    report = toy_report(ToyConfig(n=n, m=m, classes=classes, tokenizer=tokenizer, l=l, partitions=partitions,
                                  seed=seed))
    if json_path:
        fs.write_json_atomic(json_path, report)
    typer.echo(render(report))
    if not report["ok"]:
        raise typer.Exit(1)
