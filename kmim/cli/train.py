"""`kmim train` and `kmim export`."""

from __future__ import annotations

import sys
from typing import Optional

import typer

SET_HELP = (
    "section.field=value, repeatable: any field of the config under its name in config.json "
    "(`kmim train`: optim.epochs=5; `kmim run`: cluster.k=100, train.optim.epochs=5)."
)


def train(
    overrides: Optional[list[str]] = typer.Argument(
        None, help="section.field=value overrides, as in config.json (optim.epochs=5); the same as --set."
    ),
    config: Optional[str] = typer.Option(None, "--config", help="Recipe YAML (see manifests/recipes/)."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    data: Optional[str] = typer.Option(None, help="Training shards (overrides data.train)."),
    output: Optional[str] = typer.Option(None, help="Run folder (overrides output)."),
    nproc: int = typer.Option(
        1,
        help="Local DDP processes (own launcher, store on 127.0.0.1; gloo on CPU, NCCL with a GPU per rank, else gloo).",
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in the output folder from its latest checkpoint."
    ),
) -> None:
    """Masked image modeling pretraining (K-MIM tokens, MAE pixels, or online tokens), DDP."""
    overrides = list(overrides or []) + list(sets or [])
    if data:
        overrides.append(f"data.train={data}")
    if output:
        overrides.append(f"output={output}")
    from kmim.trainer.distributed import process_info, relaunch_ranks, wants_relaunch

    if wants_relaunch(nproc):
        sys.exit(relaunch_ranks(nproc))
    from kmim.trainer.config import load_config
    from kmim.trainer.train import train as run

    summary = run(load_config(config, overrides), resume=resume)
    info = process_info()
    if info.is_main:
        typer.echo(
            f"train: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
            f"{summary['images_per_s']:.1f} images/s on {summary['world_size']} process(es)"
        )
    if info.distributed:  # every rank: the loss is averaged over ranks, so each must print the same number
        typer.echo(
            f"rank {info.rank} of {info.world_size}: step {summary['steps']}, final loss {summary['final_loss']!r}"
        )


def export(
    run_dir: str = typer.Argument(..., help="A `kmim train` run folder."),
    out: str = typer.Argument(..., help="Output .safetensors file (local path or fsspec URL)."),
) -> None:
    """Write the pretrained encoder so that timm.create_model(..., pretrained_cfg_overlay=dict(file=OUT)) loads it."""
    from kmim.trainer.export import export_encoder

    r = export_encoder(run_dir, out)
    typer.echo(
        f"export: {r['tensors']} tensors of {r['encoder']} (step {r['step']}) -> {r['out']}; load with "
        f"timm.create_model('{r['encoder']}', pretrained=True, pretrained_cfg_overlay=dict(file='{r['out']}'), "
        f"num_classes=0, img_size={r['image_size']})"
    )
