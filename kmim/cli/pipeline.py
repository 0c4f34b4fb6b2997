"""`kmim pipeline ...`: the Ray stages."""

from __future__ import annotations

from typing import Optional

import typer

pipeline_app = typer.Typer(help="K-MIM pipeline stages on Ray: extract -> cluster -> tokenize.", no_args_is_help=True)

ADDRESS_HELP = "Ray cluster to join (default: $RAY_ADDRESS, else an embedded local Ray on 127.0.0.1)."


@pipeline_app.command("extract")
def extract(
    input: str = typer.Argument(..., help="Dataset: shards dir, brace pattern, shards.json, tar, or image folder."),
    output: str = typer.Argument(..., help="Output folder or fsspec URL for the feature files."),
    extractor: str = typer.Option("pixel", help="'pixel' or 'timm:MODEL' (any timm ViT)."),
    weights: Optional[str] = typer.Option(None, help="timm weights: local path or fsspec URL (.safetensors, .pth)."),
    image_size: int = typer.Option(224, help="Side of view 0 (Resize + CenterCrop)."),
    patch_size: int = typer.Option(16, help="Patch side in pixels."),
    crop_pct: float = typer.Option(0.875, help="Center-crop share of view 0, as in MAE evaluation."),
    patches_per_image: Optional[int] = typer.Option(None, help="Keep a deterministic sample of N patches per image."),
    dtype: str = typer.Option("float16", help="Stored feature type: float16 or float32."),
    seed: int = typer.Option(0, help="Seed of the patch sample."),
    batch_size: int = typer.Option(64, help="Images per extractor call."),
    gpus_per_worker: float = typer.Option(0.0, help="GPUs per Ray actor (bf16 autocast on GPU)."),
    cpus_per_worker: float = typer.Option(1.0, help="CPUs per Ray actor."),
    max_retries: int = typer.Option(2, help="Retries of a failed shard before it is reported."),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
) -> None:
    """Per-patch features of every image, one Ray actor call per input shard; resumable."""
    from kmim.pipeline.extract import ExtractConfig, extract as run, summary_line

    config = ExtractConfig(extractor=extractor, weights=weights, image_size=image_size, patch_size=patch_size,
                           crop_pct=crop_pct, patches_per_image=patches_per_image, dtype=dtype, seed=seed,
                           batch_size=batch_size, gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
                           max_retries=max_retries)
    result = run(input, output, config, address)
    typer.echo(summary_line(result.manifest, output, ran=result.ran))


@pipeline_app.command("cluster")
def cluster(
    features: str = typer.Argument(..., help="A finished `kmim pipeline extract` output."),
    output: str = typer.Argument(..., help="Output folder or fsspec URL for the codebook."),
    k: int = typer.Option(..., "--k", help="Number of centers (codebook size)."),
    epochs: int = typer.Option(20, help="Full passes over all features (the paper's unit)."),
    init: str = typer.Option("kmeans++", help="kmeans++ (on a sample), kmeans-parallel (k-means||), or random."),
    sample_for_init: int = typer.Option(65536, help="Points sampled for k-means++."),
    spherical: bool = typer.Option(False, "--spherical", help="Cosine k-means: unit-normalise features and centers."),
    minibatch: Optional[int] = typer.Option(None, help="Mini-batch k-means (Sculley) with this batch size."),
    seed: int = typer.Option(0, help="Seed of every random draw."),
    tol: float = typer.Option(0.0, help="Stop when the relative inertia gain of an epoch falls below this."),
    init_from: Optional[str] = typer.Option(None, help="Start from given centers: a codebook folder or .safetensors."),
    workers: Optional[int] = typer.Option(None, help="Ray actors (default: one per CPU or GPU, at most one per file)."),
    gpus_per_worker: float = typer.Option(0.0, help="GPUs per actor (faiss GPU index)."),
    memory_per_worker_gb: Optional[float] = typer.Option(None, help="Cache features in memory up to this size, else stream."),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
) -> None:
    """A codebook of K centers by exact distributed Lloyd epochs on Ray + faiss; resumable."""
    from kmim.pipeline.cluster import ClusterConfig, cluster as run, summary_line

    config = ClusterConfig(k=k, epochs=epochs, init=init, sample_for_init=sample_for_init, spherical=spherical,
                           minibatch=minibatch, seed=seed, tol=tol, init_from=init_from, num_workers=workers,
                           gpus_per_worker=gpus_per_worker, memory_per_worker_gb=memory_per_worker_gb)
    typer.echo(summary_line(run(features, output, config, address), output))


@pipeline_app.command("tokenize")
def tokenize(
    input: str = typer.Argument(..., help="Dataset: shards dir, brace pattern, shards.json, tar, or image folder."),
    output: str = typer.Argument(..., help="Output folder or fsspec URL for the token shards."),
    codebook: str = typer.Option(..., help="A finished `kmim pipeline cluster` output."),
    views: int = typer.Option(2, help="Views per image: view 0 = center crop, the rest RandomResizedCrop + flip."),
    seed: int = typer.Option(0, help="Seed of the random views."),
    weights: Optional[str] = typer.Option(None, help="The extractor weights the codebook was built with (checked by hash)."),
    tcas_form: str = typer.Option("C", help="TCAS first term: 'C' ((1 - C_ii)^2) or 'norm' ((1 - ||R_i||)^2)."),
    batch_size: int = typer.Option(64, help="Views per extractor call."),
    gpus_per_worker: float = typer.Option(0.0, help="GPUs per Ray actor."),
    max_retries: int = typer.Option(2, help="Retries of a failed shard before it is reported."),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
) -> None:
    """Token shards (image bytes, label, tokens.npy, views.json) + TCAS report; resumable."""
    from kmim.pipeline.tokenize import TokenizeConfig, summary_line, tokenize as run

    config = TokenizeConfig(views=views, seed=seed, tcas_form=tcas_form, weights=weights, batch_size=batch_size,
                            gpus_per_worker=gpus_per_worker, max_retries=max_retries)
    typer.echo(summary_line(run(input, output, codebook, config, address), output))
