"""`kmim eval ...`: score tokenizers and encoders."""

from __future__ import annotations

import json
from typing import Optional

import typer

eval_app = typer.Typer(help="Evaluate tokenizers (TCAS) and encoders.", no_args_is_help=True)


@eval_app.command("tcas")
def tcas(
    data: str = typer.Argument(..., help="A labelled dataset (shards or image folder)."),
    codebook: str = typer.Option(..., help="A finished `kmim pipeline cluster` output."),
    weights: Optional[str] = typer.Option(None, help="The extractor weights the codebook was built with."),
    form: str = typer.Option("C", help="TCAS first term: 'C' ((1 - C_ii)^2) or 'norm' ((1 - ||R_i||)^2)."),
    output: Optional[str] = typer.Option(None, help="Also write the report as JSON here."),
    address: Optional[str] = typer.Option(None, help="Ray cluster to join (default: an embedded local Ray)."),
) -> None:
    """TCAS (paper eq. 8) and codebook usage of a codebook on labelled data, without writing shards."""
    from kmim import fs
    from kmim.pipeline.tokenize import tcas_report

    report = tcas_report(data, codebook, weights=weights, form=form, address=address)
    if output:
        fs.write_json_atomic(output, report)
    t, u = report["tcas"], report["usage"]
    typer.echo(json.dumps({k: v for k, v in report.items() if k != "skipped"}, indent=2))
    typer.echo(f"TCAS {t['tcas']:.4f} (K={t['k']}, l1={t['l1']}, {t['classes']} classes, form {t['form']}); "
               f"{u['used_codes']} codes used, {u['dead_codes']} dead, perplexity {u['perplexity']:.1f}")
