"""`kmim run`, `kmim ls`, `kmim show`: the whole job from one recipe, and what it left under the root."""

from __future__ import annotations

import json
from typing import Optional

import typer

from kmim.cli.train import SET_HELP


def run(
    recipe: str = typer.Argument(..., help="A pipeline recipe (see manifests/recipes/digits.yaml)."),
    root: str = typer.Option(
        "out", help="Where artifacts live: ROOT/<stage>/<fingerprint>/ (local path or fsspec URL)."
    ),
    stages: str = typer.Option(
        "data,extract,cluster,tokenize,train,eval",
        help="Comma-separated stages to run; earlier ones must then be finished under ROOT.",
    ),
    run_name: Optional[list[str]] = typer.Option(
        None, "--run", help="Only this variant of `runs:` (repeatable)."
    ),
    nproc: int = typer.Option(
        1,
        help="DDP processes per training run (own launcher; gloo on CPU, NCCL with a GPU per rank, else gloo).",
    ),
    address: Optional[str] = typer.Option(
        None, help="Ray cluster to join (default: RAY_ADDRESS or an embedded Ray)."
    ),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Images to a trained, evaluated encoder: extract -> cluster -> tokenize -> train -> eval, reusing finished stages."""
    from kmim.lineage.recipe import load_recipe
    from kmim.lineage.runner import run_recipe

    sets = list(set_ or [])
    report = run_recipe(
        load_recipe(recipe, sets),
        root,
        [s.strip() for s in stages.split(",") if s.strip()],
        list(run_name or []) or None,
        nproc,
        address,
        sets,
    )
    counts: dict[str, int] = {}
    for step in report.steps:
        counts[step.status] = counts.get(step.status, 0) + 1
    from kmim.trainer.distributed import is_main_process

    if is_main_process():
        typer.echo(
            f"run: {len(report.steps)} steps ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}) under {report.root}"
        )


def ls(root: str = typer.Option("out", help="The root `kmim run` wrote to.")) -> None:
    """Artifacts under a root with their lineage: stage, fingerprint, status, what made them, from what."""
    from kmim.lineage.catalog import list_artifacts, render_ls

    typer.echo(render_ls(list_artifacts(root)))


def show(
    path: str = typer.Argument(..., help="An artifact folder (see `kmim ls`)."),
    plots: Optional[str] = typer.Option(
        None,
        "--plots",
        help="A codebook (cluster output): draw its token atlas into this folder (atlas-patches.png, "
        "atlas-usage.png, atlas-classes.png, atlas.json).",
    ),
    features: Optional[str] = typer.Option(
        None, help="With --plots: the extract output to draw from (default: the one it was clustered from)."
    ),
) -> None:
    """A stage's lineage, manifest and stats as JSON; with --plots, a codebook's token atlas."""
    from kmim.lineage.catalog import show as describe

    typer.echo(json.dumps(describe(path), indent=2))
    if plots:
        from kmim.atlas import atlas

        doc = atlas(path, plots, features)
        tcas_text = f", TCAS {doc['tcas']['tcas']:.4f}" if doc.get("tcas") else ""
        typer.echo(
            f"atlas: {', '.join(doc['files'].values())} in {plots} ({doc['rows']} patches of {doc['features']}"
            f"{tcas_text})"
        )
