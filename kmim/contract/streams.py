"""Named random streams: every seeded draw in kmim is one row of `STREAMS`.

Determinism is a promise (docs/FORMATS.md): views, patch samples, k-means draws, shard order, view choice,
masks... are pure functions of the user's seed and a few integer keys. Each stream has a name, the names of
its keys in call order, and how those keys become a seed (its `form`):

- "entropy": the list of keys with the stream's `salt` inserted at position `salt_at`, given to
  `np.random.default_rng` / `np.random.SeedSequence`; a stream without a salt uses the keys alone;
- "seed": the single key itself, a bare int: `default_rng(seed)`, `torch.manual_seed(seed)`;
- "sum": the sum of the keys (timm's Mixup draws from numpy's global RNG, seeded with seed + rank);
- "fixed": no keys; the constant `fixed` is the seed (a randomly initialised extractor that every worker must
  build the same).

The salts, their positions and the unsalted forms are exactly what the code used before this table existed,
so every artifact written before replays bit-identically. Never edit a row: add a new stream with a new salt.
Salts are unique among salted streams; unsalted "entropy" streams are told apart only by their keys (e.g.
`view` with view 90 and `patch_sample` draw from the same [seed, H(key), 90]): kept as it was, for identity.

A sample key enters a stream as `kmim.contract.views.key_hash(key)` (an int); all keys are non-negative ints.

    rng("shard_order", seed, epoch)                  # np.random.default_rng([seed, 11, epoch])
    torch_generator("mask", seed, step, rank)        # manual_seed(SeedSequence([seed, step, rank]).generate_state(1)[0])
    torch.manual_seed(seed_state("model_init", seed))
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

FORMS = ("entropy", "seed", "sum", "fixed")


@dataclass(frozen=True)
class Stream:
    name: str
    keys: tuple[str, ...]  # the keys' names, in the order the helpers take them
    doc: str
    form: str = "entropy"
    salt: int | None = None  # "entropy" only: the stream's constant, inserted at `salt_at` in the keys
    salt_at: int = 1  # index in the entropy list (1: right after the seed)
    fixed: int | None = None  # "fixed" only: the seed

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"stream {self.name!r}: form must be one of {FORMS}, got {self.form!r}")
        if self.salt is not None and self.form != "entropy":
            raise ValueError(f"stream {self.name!r}: only an 'entropy' stream has a salt")
        if (self.fixed is not None) != (self.form == "fixed") or (self.form == "fixed" and self.keys):
            raise ValueError(
                f"stream {self.name!r}: a 'fixed' stream has a fixed seed and no keys, no other has"
            )
        if self.form in ("seed",) and len(self.keys) != 1:
            raise ValueError(f"stream {self.name!r}: a 'seed' stream has exactly one key")

    def entropy(self, *keys: int) -> int | list[int]:
        """What `np.random.default_rng` / `SeedSequence` are given for these keys."""
        if len(keys) != len(self.keys):
            raise TypeError(
                f"stream {self.name!r} takes keys ({', '.join(self.keys)}), got {len(keys)} values"
            )
        values = [operator.index(k) for k in keys]
        if self.form == "entropy":
            if self.salt is not None:
                values.insert(self.salt_at, self.salt)
            return values
        if self.form == "seed":
            return values[0]
        if self.form == "sum":
            return sum(values)
        return self.fixed  # type: ignore[return-value]


def _table(*streams: Stream) -> MappingProxyType:
    names = [s.name for s in streams]
    salts = [s.salt for s in streams if s.salt is not None]
    if len(set(names)) != len(names) or len(set(salts)) != len(salts):
        raise ValueError("random streams need unique names and unique salts")
    return MappingProxyType({s.name: s for s in streams})


STREAMS: MappingProxyType[str, Stream] = _table(
    # data
    Stream("data_split", ("seed",), "digits train/val split: one permutation per class", form="seed"),
    Stream(
        "synthetic_class",
        ("seed", "label"),
        "synthetic data: a class's grating, colours and motif",
        salt=1_000_003,
    ),
    Stream("synthetic_image", ("seed", "index"), "synthetic data: one image's phase, motifs and noise"),
    # views and patches (the contract of token shards)
    Stream("view", ("seed", "key_hash", "view"), "RandomResizedCrop + flip of view >= 1 of a sample"),
    Stream(
        "patch_sample",
        ("seed", "key_hash"),
        "extract: the patches_per_image kept of an image",
        salt=0x5A,
        salt_at=2,
    ),
    Stream("extractor_init", (), "timm extractor without weights: the random init", form="fixed", fixed=0),
    # k-means (pipeline/cluster.py)
    Stream("kmeans_init", ("seed",), "random / kmeans++ / k-means|| initial centers", salt=1),
    Stream("kmeans_reseed", ("seed", "epoch"), "splitting the largest cluster into an empty one", salt=3),
    Stream("kmeans_minibatch", ("seed", "epoch"), "mini-batch k-means: the rows of each step", salt=4),
    Stream(
        "kmeans_sample", ("seed", "file"), "uniform rows of one feature file (kmeans++ on a sample)", salt=101
    ),
    Stream(
        "kmeans_oversample",
        ("seed", "round", "file"),
        "k-means||: one round's candidates in one file",
        salt=202,
    ),
    # training data order (trainer/data.py, trainer/finetune.py)
    Stream(
        "view_cycle",
        ("seed", "cycle", "key_hash"),
        "the order of a sample's stored views in one cycle of V epochs (kmim <= 0.2: view_choice, salt 7)",
        salt=19,
    ),
    Stream(
        "grid_window",
        ("seed", "epoch", "key_hash"),
        "grid views: the render and the patch-aligned window a sample trains on in an epoch",
        salt=23,
    ),
    Stream(
        "shard_order",
        ("seed", "epoch"),
        "an epoch's shard permutation before it is split over slots",
        salt=11,
    ),
    Stream(
        "shard_cycle",
        ("seed", "epoch", "cycle", "worker", "rank"),
        "one slot's shards, per pass over them",
        salt=13,
    ),
    Stream(
        "shuffle_buffer",
        ("seed", "epoch", "rank", "worker"),
        "the sample shuffle buffer of one slot",
        salt=17,
    ),
    Stream("loader", ("seed",), "the DataLoader's own generator (worker base seeds)", form="seed"),
    # training
    Stream(
        "model_init",
        ("seed",),
        "torch's global RNG: model init, drop path (pretrain, fine-tune, probe)",
        form="seed",
    ),
    Stream(
        "mask",
        ("seed", "step", "rank"),
        "MIM masks: a pure function of (seed, step, rank), so resume replays",
    ),
    Stream(
        "mixup", ("seed", "rank"), "numpy's global RNG, which timm's Mixup / CutMix draw from", form="sum"
    ),
    Stream("probe_order", ("seed",), "linear probe: the batch order of each epoch", form="seed"),
    Stream(
        "theorem1_partitions",
        ("seed",),
        "theory toy: the random partitions Theorem 1 is checked against",
        form="seed",
    ),
    # benchmarks (bench/)
    Stream("bench_features", ("seed",), "bench/kmeans.py: the Gaussian-mixture features", form="seed"),
    Stream("bench_kmeans_init", (), "bench/kmeans.py: the shared initial centers", form="fixed", fixed=1),
    Stream("bench_random_codebook", ("seed",), "bench/science/tcas_vs_k.py: random codebooks", form="seed"),
)


def stream(name: str) -> Stream:
    try:
        return STREAMS[name]
    except KeyError:
        raise KeyError(f"no random stream {name!r}; known: {', '.join(STREAMS)}") from None


def entropy(name: str, *keys: int) -> int | list[int]:
    """The seed material of stream `name` for these keys (in the order of `STREAMS[name].keys`)."""
    return stream(name).entropy(*keys)


def rng(name: str, *keys: int) -> np.random.Generator:
    """`np.random.default_rng(entropy(name, *keys))`: e.g. rng("shard_order", seed, epoch) is
    default_rng([seed, 11, epoch]); rng("data_split", seed) is default_rng(seed)."""
    return np.random.default_rng(entropy(name, *keys))


def seed_state(name: str, *keys: int) -> int:
    """One int seed, for torch.manual_seed / np.random.seed: the key itself ("seed"), their sum ("sum"), the
    constant ("fixed"), or the first uint32 word of SeedSequence(entropy) ("entropy")."""
    s = stream(name)
    e = s.entropy(*keys)
    if s.form == "entropy":
        return int(np.random.SeedSequence(e).generate_state(1)[0])
    return int(e)  # type: ignore[arg-type]


def torch_generator(name: str, *keys: int) -> torch.Generator:
    """A CPU torch.Generator seeded with seed_state(name, *keys): e.g. torch_generator("mask", seed, step, rank)."""
    import torch

    return torch.Generator().manual_seed(seed_state(name, *keys))
