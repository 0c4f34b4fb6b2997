"""`kmim eval ...`: score tokenizers and encoders."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from kmim.cli.options import config_options
from kmim.pipeline.configs import TokenizeConfig
from kmim.trainer.config import FinetuneConfig, KnnConfig, LinearConfig
from kmim.trainer.distributed import is_main_process, relaunch_ranks, wants_relaunch

eval_app = typer.Typer(help="Evaluate tokenizers (TCAS) and encoders.", no_args_is_help=True)


@eval_app.command("tcas")
@config_options(
    TokenizeConfig, where="tcas", skip=("views", "seed", "gpus_per_worker", "cpus_per_worker", "max_retries")
)
def tcas(
    data: str = typer.Argument(..., help="A labelled dataset (shards or image folder)."),
    codebook: str = typer.Option(..., help="A finished `kmim pipeline cluster` output."),
    output: Optional[str] = typer.Option(None, help="Also write the report as JSON here."),
    address: Optional[str] = typer.Option(None, help="Ray cluster to join (default: an embedded local Ray)."),
    config: TokenizeConfig = None,  # type: ignore[assignment]  # tokenize's TCAS settings, as in `kmim pipeline tokenize`
) -> None:
    """TCAS (paper eq. 8) and codebook usage of a codebook on labelled data, without writing shards."""
    from kmim import fs
    from kmim.pipeline.tokenize import tcas_report

    report = tcas_report(
        data,
        codebook,
        weights=config.weights,
        form=config.tcas_form,
        address=address,
        batch_size=config.batch_size,
    )
    if output:
        fs.write_json_atomic(output, report)
    t, u = report["tcas"], report["usage"]
    typer.echo(json.dumps({k: v for k, v in report.items() if k != "skipped"}, indent=2))
    typer.echo(
        f"TCAS {t['tcas']:.4f} (K={t['k']}, l1={t['l1']}, {t['classes']} classes, form {t['form']}); "
        f"{u['used_codes']} codes used, {u['dead_codes']} dead, perplexity {u['perplexity']:.1f}"
    )


@eval_app.command("linear")
@config_options(LinearConfig, where="linear")
def linear(
    source: str = typer.Argument(..., help="A `kmim train` run folder or an exported encoder .safetensors."),
    train: str = typer.Option(..., help="Labelled training data (shards or image folder)."),
    val: str = typer.Option(..., help="Labelled validation data."),
    nproc: int = typer.Option(
        1, help="Local DDP processes sharing the feature extraction (own launcher, store on 127.0.0.1)."
    ),
    config: LinearConfig = None,  # type: ignore[assignment]  # built from the options by config_options
) -> None:
    """MAE linear probe: frozen encoder, BatchNorm1d(affine=False) + linear head; writes eval-linear.json."""
    if wants_relaunch(nproc):
        sys.exit(relaunch_ranks(nproc))
    from kmim.trainer.probe import evaluate

    r = evaluate("linear", source, train, val, config)
    if is_main_process():
        typer.echo(
            f"linear: top-1 {100 * r['top1']:.2f} %, top-5 {100 * r['top5']:.2f} % on {r['val_samples']} images "
            f"({r['encoder']}, {r['seconds']:.1f}s)"
        )


@eval_app.command("knn")
@config_options(KnnConfig, where="knn")
def knn(
    source: str = typer.Argument(..., help="A `kmim train` run folder or an exported encoder .safetensors."),
    train: str = typer.Option(..., help="Labelled training data (the neighbours)."),
    val: str = typer.Option(..., help="Labelled validation data."),
    nproc: int = typer.Option(
        1, help="Local DDP processes sharing the feature extraction (own launcher, store on 127.0.0.1)."
    ),
    config: KnnConfig = None,  # type: ignore[assignment]
) -> None:
    """Weighted k-NN on normalised frozen features (DINO's protocol); writes eval-knn.json."""
    if wants_relaunch(nproc):
        sys.exit(relaunch_ranks(nproc))
    from kmim.trainer.probe import evaluate

    r = evaluate("knn", source, train, val, config)
    if is_main_process():
        typer.echo(
            f"knn: top-1 {100 * r['top1']:.2f} %, top-5 {100 * r['top5']:.2f} % on {r['val_samples']} images "
            f"({r['encoder']}, {r['seconds']:.1f}s)"
        )


@eval_app.command("finetune")
@config_options(FinetuneConfig, where="finetune")
def finetune(
    source: str = typer.Argument(..., help="A `kmim train` run folder or an exported encoder .safetensors."),
    train: str = typer.Option(..., help="Labelled training data (shards or image folder)."),
    val: str = typer.Option(..., help="Labelled validation data."),
    nproc: int = typer.Option(
        1,
        help="Local DDP processes (own launcher, store on 127.0.0.1; gloo on CPU, NCCL with a GPU per rank, else gloo).",
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from the last epoch checkpoint in RUN/finetune/."
    ),
    config: FinetuneConfig = None,  # type: ignore[assignment]
) -> None:
    """Full fine-tuning: layer-wise lr decay, drop path, label smoothing, mixup/cutmix, DDP; writes eval-finetune.json."""
    if wants_relaunch(nproc):
        sys.exit(relaunch_ranks(nproc))
    from kmim.trainer.finetune import finetune as run

    r = run(source, train, val, config, resume=resume)
    if is_main_process():
        typer.echo(
            f"finetune: top-1 {100 * r['top1']:.2f} %, top-5 {100 * r['top5']:.2f} % on {r['val_samples']} "
            f"images after {r['steps']} steps on {r['world_size']} process(es) ({r['encoder']}, {r['seconds']:.1f}s)"
        )


@eval_app.command("compare")
def compare(
    runs: list[str] = typer.Argument(..., help="`kmim train` run folders."),
    output: str = typer.Option("compare", help="Folder for compare.md, compare.json and the PNG plots."),
) -> None:
    """Runs side by side (target, K, TCAS, k-NN, linear, fine-tune) as Markdown, plus loss and accuracy plots."""
    from kmim.trainer.compare import compare as run

    table, plots = run(runs, output)
    typer.echo(table)
    typer.echo(f"plots: {', '.join(plots)}")
