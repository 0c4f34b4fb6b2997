"""`kmim data ...`: make datasets as WebDataset shards."""

from __future__ import annotations

import typer

from kmim.data.digits import DigitsConfig, write_digits
from kmim.data.folder import FolderShardConfig, shard_folder
from kmim.data.synthetic import SyntheticConfig, write_synthetic
from kmim.data.writer import summary_line

data_app = typer.Typer(help="Make datasets as WebDataset shards (with a shards.json index).", no_args_is_help=True)


@data_app.command("digits")
def digits(
    out: str = typer.Argument(..., help="Output folder or fsspec URL."),
    image_size: int = typer.Option(32, help="Side of the upsampled RGB images."),
    val_fraction: float = typer.Option(0.2, help="Share of each class held out as `val`."),
    seed: int = typer.Option(0, help="Seed of the train/val split."),
    shard_size: int = typer.Option(256, help="Samples per shard."),
) -> None:
    """scikit-learn's bundled handwritten digits (1,797 real images, 10 classes) as train/val shards."""
    result = write_digits(out, DigitsConfig(image_size=image_size, val_fraction=val_fraction, seed=seed, shard_size=shard_size))
    typer.echo(summary_line(result))


@data_app.command("synthetic")
def synthetic(
    out: str = typer.Argument(..., help="Output folder or fsspec URL."),
    num_images: int = typer.Option(..., help="Number of images."),
    image_size: int = typer.Option(64, help="Image side in pixels."),
    classes: int = typer.Option(10, help="Number of classes."),
    seed: int = typer.Option(0, help="Seed: same seed, same images."),
    shard_size: int = typer.Option(1000, help="Samples per shard."),
    format: str = typer.Option("png", help="Image encoding: png or jpg."),
    val_fraction: float = typer.Option(0.0, help="Share of images written as a `val` split."),
) -> None:
    """Deterministic images with class-dependent local structure, for scale and failure tests."""
    config = SyntheticConfig(num_images=num_images, image_size=image_size, classes=classes, seed=seed,
                             shard_size=shard_size, format=format, val_fraction=val_fraction)
    typer.echo(summary_line(write_synthetic(out, config)))


@data_app.command("shard")
def shard(
    src: str = typer.Argument(..., help="ImageNet-style folder: SRC/<class>/<image>."),
    out: str = typer.Argument(..., help="Output folder or fsspec URL."),
    shard_size: int = typer.Option(1000, help="Samples per shard."),
    split: str = typer.Option("train", help="Split name used in shard names and the index."),
) -> None:
    """Pack an image folder into labelled shards with a classes.json; bytes pass through unchanged."""
    typer.echo(summary_line(shard_folder(src, out, FolderShardConfig(shard_size=shard_size, split=split))))
