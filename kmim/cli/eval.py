"""`kmim eval ...`: score tokenizers and encoders."""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

import typer

from kmim.cli.train import relaunch_with_torchrun, wants_torchrun

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


@eval_app.command("linear")
def linear(
    source: str = typer.Argument(..., help="A `kmim train` run folder or an exported encoder .safetensors."),
    train: str = typer.Option(..., help="Labelled training data (shards or image folder)."),
    val: str = typer.Option(..., help="Labelled validation data."),
    pool: str = typer.Option("cls", help="cls token or mean of patch tokens."),
    epochs: int = typer.Option(100, help="Probe epochs (on cached features)."),
    batch_size: int = typer.Option(256, help="Probe batch size."),
    blr: float = typer.Option(0.1, help="Base lr: lr = blr * batch / 256."),
    optimizer: str = typer.Option("sgd", help="sgd, or lars (MAE's; needs a larger --blr at small batch sizes)."),
    seed: int = typer.Option(0, help="Seed of the head init and batch order."),
    nproc: int = typer.Option(1, help="Local DDP processes sharing the feature extraction (torchrun)."),
) -> None:
    """MAE linear probe: frozen encoder, BatchNorm1d(affine=False) + linear head; writes eval-linear.json."""
    if wants_torchrun(nproc):
        sys.exit(relaunch_with_torchrun(nproc))
    from kmim.trainer.probe import LinearConfig, evaluate

    r = evaluate("linear", source, train, val, LinearConfig(epochs=epochs, batch_size=batch_size, blr=blr,
                                                            optimizer=optimizer, pool=pool, seed=seed))
    if _is_main():
        typer.echo(f"linear: top-1 {100 * r['top1']:.2f} %, top-5 {100 * r['top5']:.2f} % on {r['val_samples']} images "
               f"({r['encoder']}, {r['seconds']:.1f}s)")


@eval_app.command("knn")
def knn(
    source: str = typer.Argument(..., help="A `kmim train` run folder or an exported encoder .safetensors."),
    train: str = typer.Option(..., help="Labelled training data (the neighbours)."),
    val: str = typer.Option(..., help="Labelled validation data."),
    k: int = typer.Option(20, help="Neighbours."),
    temperature: float = typer.Option(0.07, help="Vote weight exp(similarity / T)."),
    pool: str = typer.Option("cls", help="cls token or mean of patch tokens."),
    nproc: int = typer.Option(1, help="Local DDP processes sharing the feature extraction (torchrun)."),
) -> None:
    """Weighted k-NN on normalised frozen features (DINO's protocol); writes eval-knn.json."""
    if wants_torchrun(nproc):
        sys.exit(relaunch_with_torchrun(nproc))
    from kmim.trainer.probe import KnnConfig, evaluate

    r = evaluate("knn", source, train, val, KnnConfig(k=k, temperature=temperature, pool=pool))
    if _is_main():
        typer.echo(f"knn: top-1 {100 * r['top1']:.2f} %, top-5 {100 * r['top5']:.2f} % on {r['val_samples']} images "
               f"({r['encoder']}, {r['seconds']:.1f}s)")


@eval_app.command("finetune")
def finetune(
    source: str = typer.Argument(..., help="A `kmim train` run folder or an exported encoder .safetensors."),
    train: str = typer.Option(..., help="Labelled training data (shards or image folder)."),
    val: str = typer.Option(..., help="Labelled validation data."),
    epochs: int = typer.Option(50, help="Fine-tuning epochs."),
    batch_size: int = typer.Option(64, help="Batch size per process."),
    blr: float = typer.Option(1e-3, help="Base lr: lr = blr * global batch / 256."),
    layer_decay: float = typer.Option(0.75, help="Layer-wise lr decay: block i of L gets lr * decay^(L - i)."),
    drop_path: float = typer.Option(0.1, help="Stochastic depth rate."),
    label_smoothing: float = typer.Option(0.1, help="Label smoothing (also applied to mixup targets)."),
    mixup: float = typer.Option(0.0, help="Mixup alpha (MAE: 0.8); 0 = off."),
    cutmix: float = typer.Option(0.0, help="CutMix alpha (MAE: 1.0); 0 = off."),
    warmup_epochs: float = typer.Option(5.0, help="Linear warmup epochs, then cosine."),
    weight_decay: float = typer.Option(0.05, help="AdamW weight decay (not on norms, biases, tokens)."),
    pool: str = typer.Option("mean", help="mean of patch tokens + fc_norm (MAE fine-tuning), or cls."),
    num_classes: Optional[int] = typer.Option(None, help="Default: 1 + the largest val label."),
    num_workers: int = typer.Option(1, help="Data loader processes per rank."),
    samples_per_epoch: Optional[int] = typer.Option(None, help="Default: the training data's sample count."),
    seed: int = typer.Option(0, help="Seed of the head init, data order and augmentation."),
    nproc: int = typer.Option(1, help="Local DDP processes, launched with torchrun (gloo on CPU, NCCL on GPU)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last epoch checkpoint in RUN/finetune/."),
) -> None:
    """Full fine-tuning: layer-wise lr decay, drop path, label smoothing, mixup/cutmix, DDP; writes eval-finetune.json."""
    if wants_torchrun(nproc):
        sys.exit(relaunch_with_torchrun(nproc))
    from kmim.trainer.finetune import FinetuneConfig, finetune as run

    cfg = FinetuneConfig(epochs=epochs, batch_size=batch_size, blr=blr, layer_decay=layer_decay, drop_path=drop_path,
                         label_smoothing=label_smoothing, mixup=mixup, cutmix=cutmix, warmup_epochs=warmup_epochs,
                         weight_decay=weight_decay, pool=pool, num_classes=num_classes, num_workers=num_workers,
                         samples_per_epoch=samples_per_epoch, seed=seed)
    r = run(source, train, val, cfg, resume=resume)
    if _is_main():
        typer.echo(f"finetune: top-1 {100 * r['top1']:.2f} %, top-5 {100 * r['top5']:.2f} % on {r['val_samples']} "
                   f"images after {r['steps']} steps on {r['world_size']} process(es) ({r['encoder']}, {r['seconds']:.1f}s)")


def _is_main() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


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
