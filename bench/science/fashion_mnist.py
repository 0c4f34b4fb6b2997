"""The paper's questions on Fashion-MNIST (70,000 real images; issue 16): `kmim_vs_mae` on its recipe.

manifests/recipes/fashion-mnist.yaml: 32 px, 4 px patches, vit_micro_patch4_32, batch 256, 4 epochs,
K-MIM PIXEL with 6 stored views per image (center + 5 RandomResizedCrop + flip, one chosen per sample and epoch: the augmentation the MAE baseline draws afresh each epoch), probes
on the official 10,000 test images. Defaults: seeds 0,1,2 of K-MIM K = 50 and MAE; the K sweep
10,25,50,100,200,1024 with seed 0 at 1 epoch (TCAS of each codebook, one training per K: what a 2-hour budget on 2
CPUs allows). Any `kmim_vs_mae` option overrides these (e.g. `--sweep-seeds 0,1,2`); reruns into the same
root reuse every finished stage.

Run: uv run python -m bench.science.fashion_mnist [--epochs E] [--root DIR]
Writes bench/science/out/fashion_mnist/kmim_vs_mae.json, .md, .png.
"""

from __future__ import annotations

import sys

from bench.science import kmim_vs_mae

DEFAULTS = [
    "--recipe",
    "manifests/recipes/fashion-mnist.yaml",
    "--dataset",
    "Fashion-MNIST",
    "--ks",
    "10,25,50,100,200,1024",
    "--sweep-seeds",
    "0",
    "--sweep-epochs",
    "1",
    "--root",
    "bench/science/out/fashion_mnist/root",
]


def main(argv: list[str] | None = None) -> dict:
    return kmim_vs_mae.main(DEFAULTS + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
