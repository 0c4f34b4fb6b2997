"""`kmim pipeline ...`: the Ray stages; their options are the fields of their configs (pipeline/configs.py)."""

from __future__ import annotations

from typing import Optional

import typer

from kmim.cli.options import config_options
from kmim.pipeline.configs import ClusterConfig, ExtractConfig, TokenizeConfig

pipeline_app = typer.Typer(
    help="K-MIM pipeline stages on Ray: extract -> cluster -> tokenize.", no_args_is_help=True
)

ADDRESS_HELP = "Ray cluster to join (default: $RAY_ADDRESS, else an embedded local Ray on 127.0.0.1)."


@pipeline_app.command("extract")
@config_options(ExtractConfig, where="extract")
def extract(
    input: str = typer.Argument(
        ..., help="Dataset: shards dir, brace pattern, shards.json, tar, or image folder."
    ),
    output: str = typer.Argument(..., help="Output folder or fsspec URL for the feature files."),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
    config: ExtractConfig = None,  # type: ignore[assignment]  # built from the options below by config_options
) -> None:
    """Per-patch features of every image, one Ray actor call per input shard; resumable."""
    from kmim.pipeline.extract import extract as run
    from kmim.pipeline.extract import summary_line

    result = run(input, output, config, address)
    typer.echo(summary_line(result.manifest, output, ran=result.ran))


@pipeline_app.command("cluster")
@config_options(ClusterConfig, where="cluster")
def cluster(
    features: str = typer.Argument(..., help="A finished `kmim pipeline extract` output."),
    output: str = typer.Argument(..., help="Output folder or fsspec URL for the codebook."),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
    config: ClusterConfig = None,  # type: ignore[assignment]
) -> None:
    """A codebook of K centers by exact distributed Lloyd epochs on Ray + faiss; resumable."""
    from kmim.pipeline.cluster import cluster as run
    from kmim.pipeline.cluster import summary_line

    typer.echo(summary_line(run(features, output, config, address), output))


@pipeline_app.command("tokenize")
@config_options(TokenizeConfig, where="tokenize")
def tokenize(
    input: str = typer.Argument(
        ..., help="Dataset: shards dir, brace pattern, shards.json, tar, or image folder."
    ),
    output: str = typer.Argument(..., help="Output folder or fsspec URL for the token shards."),
    codebook: str = typer.Option(..., help="A finished `kmim pipeline cluster` output."),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
    config: TokenizeConfig = None,  # type: ignore[assignment]
) -> None:
    """Token shards (image bytes, label, tokens.npy, views.json) + TCAS report; resumable."""
    from kmim.pipeline.tokenize import summary_line
    from kmim.pipeline.tokenize import tokenize as run

    typer.echo(summary_line(run(input, output, codebook, config, address), output))
