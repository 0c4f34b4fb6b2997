"""`kmim data ...`: make datasets as WebDataset shards."""

from __future__ import annotations

import typer

from kmim.cli.options import config_options
from kmim.data.digits import DigitsConfig, write_digits
from kmim.data.folder import FolderShardConfig, shard_folder
from kmim.data.idx import FashionMnistConfig, IdxConfig, write_fashion_mnist, write_idx
from kmim.data.synthetic import SyntheticConfig, write_synthetic
from kmim.data.writer import summary_line

data_app = typer.Typer(
    help="Make datasets as WebDataset shards (with a shards.json index).", no_args_is_help=True
)


@data_app.command("digits")
@config_options(DigitsConfig, where="digits")
def digits(
    out: str = typer.Argument(..., help="Output folder or fsspec URL."),
    config: DigitsConfig = None,  # type: ignore[assignment]  # built from the options by config_options
) -> None:
    """scikit-learn's bundled handwritten digits (1,797 real images, 10 classes) as train/val shards."""
    typer.echo(summary_line(write_digits(out, config)))


@data_app.command("synthetic")
@config_options(SyntheticConfig, where="synthetic")
def synthetic(
    out: str = typer.Argument(..., help="Output folder or fsspec URL."),
    config: SyntheticConfig = None,  # type: ignore[assignment]
) -> None:
    """Deterministic images with class-dependent local structure, for scale and failure tests."""
    typer.echo(summary_line(write_synthetic(out, config)))


@data_app.command("shard")
@config_options(FolderShardConfig, where="shard")
def shard(
    src: str = typer.Argument(..., help="ImageNet-style folder: SRC/<class>/<image>."),
    out: str = typer.Argument(..., help="Output folder or fsspec URL."),
    config: FolderShardConfig = None,  # type: ignore[assignment]
) -> None:
    """Pack an image folder into labelled shards with a classes.json; bytes pass through unchanged."""
    typer.echo(summary_line(shard_folder(src, out, config)))


@data_app.command("idx")
@config_options(IdxConfig, where="idx")
def idx(
    images: str = typer.Argument(..., help="IDX image file (idx3-ubyte, gzip or raw), path or fsspec URL."),
    labels: str = typer.Argument(..., help="IDX label file (idx1-ubyte) with one label per image."),
    out: str = typer.Argument(..., help="Output folder or fsspec URL; other splits already there are kept."),
    config: IdxConfig = None,  # type: ignore[assignment]
) -> None:
    """Any IDX image/label pair (MNIST, Fashion-MNIST, KMNIST, EMNIST) as one labelled split."""
    typer.echo(summary_line(write_idx(images, labels, out, config)))


@data_app.command("fashion-mnist")
@config_options(FashionMnistConfig, where="fashion-mnist")
def fashion_mnist(
    out: str = typer.Argument(..., help="Output folder or fsspec URL."),
    config: FashionMnistConfig = None,  # type: ignore[assignment]
) -> None:
    """Fashion-MNIST's 70,000 images: `train` (60,000) and `val` (the 10,000 test images), 10 classes.

    The four IDX files come from Debian's package (`apt-get install dataset-fashion-mnist`, the default
    --source) or from the dataset's site (github.com/zalandoresearch/fashion-mnist) into any folder."""
    typer.echo(summary_line(write_fashion_mnist(out, config)))
