"""The named random streams (kmim/contract/streams.py): one table, the exact seeds used before it existed,
and no seeded generator built anywhere else."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from kmim.contract import streams
from kmim.contract.streams import STREAMS, Stream, entropy, rng, seed_state, torch_generator
from kmim.contract.views import key_hash

ROOT = Path(__file__).resolve().parents[2]
KEY = "n01440764_10026"
KH = 1420011492304673172  # key_hash(KEY)

# (stream, keys, the literal seeding argument the code used before the table, its first three integers(0, 2**31))
LEGACY = [
    ("data_split", (5,), 5, [1440510676, 1728730615, 48647418]),
    ("theorem1_partitions", (5,), 5, [1440510676, 1728730615, 48647418]),
    ("synthetic_class", (5, 3), [5, 1_000_003, 3], [337922732, 1918552527, 269685938]),
    ("synthetic_image", (5, 12), [5, 12], [2105581153, 1886744442, 1174239903]),
    ("view", (5, KH, 2), [5, KH, 2], [33937030, 1601136508, 504984733]),
    ("patch_sample", (5, KH), [5, KH, 0x5A], [272829881, 1891440644, 880660365]),
    ("kmeans_init", (5,), [5, 1], [284122216, 1662590817, 1671234241]),
    ("kmeans_reseed", (5, 2), [5, 3, 2], [763939105, 1506793405, 66332261]),
    ("kmeans_minibatch", (5, 2), [5, 4, 2], [1400065565, 90240397, 341428621]),
    ("kmeans_sample", (5, 6), [5, 101, 6], [51972486, 77308334, 1142296171]),
    ("kmeans_oversample", (5, 1, 6), [5, 202, 1, 6], [312019149, 1336802801, 1103136302]),
    ("view_cycle", (5, 1, KH), [5, 19, 1, KH], [371277958, 1510386067, 1200409013]),  # new in 0.2
    ("grid_window", (5, 2, KH), [5, 23, 2, KH], [1220802148, 1649011874, 1913569730]),  # new: grid views
    ("shard_order", (5, 2), [5, 11, 2], [1321845893, 971197850, 1226260605]),
    ("shard_cycle", (5, 2, 1, 3, 4), [5, 13, 2, 1, 3, 4], [511247243, 522380553, 659132962]),
    ("shuffle_buffer", (5, 2, 4, 3), [5, 17, 2, 4, 3], [78159522, 1938128933, 1682032112]),
    ("mask", (5, 2, 4), [5, 2, 4], [1750474656, 1044453827, 856829949]),
    ("loader", (5,), 5, [1440510676, 1728730615, 48647418]),
    ("model_init", (5,), 5, [1440510676, 1728730615, 48647418]),
    ("probe_order", (5,), 5, [1440510676, 1728730615, 48647418]),
    ("bench_features", (5,), 5, [1440510676, 1728730615, 48647418]),
    ("bench_random_codebook", (5,), 5, [1440510676, 1728730615, 48647418]),
    ("mixup", (5, 3), 8, None),  # np.random.seed(seed + rank)
    ("extractor_init", (), 0, None),  # torch.manual_seed(0) around timm.create_model
    ("bench_kmeans_init", (), 1, None),  # np.random.default_rng(1) in bench/kmeans.py
]


def test_every_stream_has_a_legacy_row():
    assert sorted(name for name, *_ in LEGACY) == sorted(STREAMS)
    assert key_hash(KEY) == KH


def test_names_and_salts_are_unique_and_the_table_is_frozen():
    rows = list(STREAMS.values())
    assert len({s.name for s in rows}) == len(rows) and all(STREAMS[s.name] is s for s in rows)
    salts = [s.salt for s in rows if s.salt is not None]
    assert len(set(salts)) == len(salts)
    fixed = [s.fixed for s in rows if s.form == "fixed"]
    assert len(set(fixed)) == len(fixed)
    assert {s.salt for s in rows} - {None} == {1, 3, 4, 11, 13, 17, 19, 23, 0x5A, 101, 202, 1_000_003}
    with pytest.raises(TypeError):
        STREAMS["new"] = rows[0]  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        rows[0].salt = 99  # type: ignore[misc]
    with pytest.raises(ValueError, match="unique"):
        streams._table(Stream("a", ("seed",), "x", salt=5), Stream("b", ("seed",), "y", salt=5))
    with pytest.raises(ValueError, match="unique"):
        streams._table(Stream("a", ("seed",), "x", salt=5), Stream("a", ("seed",), "y", salt=6))


@pytest.mark.parametrize(("name", "keys", "legacy", "draws"), LEGACY, ids=[row[0] for row in LEGACY])
def test_each_stream_is_the_seed_used_before_the_table(name, keys, legacy, draws):
    assert entropy(name, *keys) == legacy
    assert type(entropy(name, *keys)) is type(legacy)  # default_rng(seed) stays a bare int, not [seed]
    if draws is not None:
        assert rng(name, *keys).integers(0, 2**31, 3).tolist() == draws
        assert np.array_equal(rng(name, *keys).random(8), np.random.default_rng(legacy).random(8))


def test_seed_state_and_torch_generators_match_the_old_constructions():
    # masks: torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))
    assert seed_state("mask", 5, 2, 4) == 1998799492
    old = torch.Generator().manual_seed(int(np.random.SeedSequence([5, 2, 4]).generate_state(1)[0]))
    assert torch.equal(
        torch.rand(6, generator=torch_generator("mask", 5, 2, 4)), torch.rand(6, generator=old)
    )
    # DataLoader and probe order: torch.Generator().manual_seed(seed)
    for name in ("loader", "probe_order"):
        assert seed_state(name, 5) == 5
        assert torch.equal(
            torch.rand(6, generator=torch_generator(name, 5)),
            torch.rand(6, generator=torch.Generator().manual_seed(5)),
        )
    assert seed_state("model_init", 7) == 7  # torch.manual_seed(cfg.seed)
    assert seed_state("mixup", 7, 3) == 10  # np.random.seed(cfg.seed + rank)
    assert seed_state("extractor_init") == 0  # torch.manual_seed(RANDOM_INIT_SEED), RANDOM_INIT_SEED = 0
    from kmim.extractors import RANDOM_INIT_SEED

    assert RANDOM_INIT_SEED == 0


def test_callers_reproduce_their_old_draws():
    from kmim.contract.views import view_rng
    from kmim.data.digits import digits_split
    from kmim.data.synthetic import class_style

    assert np.array_equal(view_rng(3, KEY, 2).random(4), np.random.default_rng([3, KH, 2]).random(4))
    labels = np.repeat(np.arange(3), 10)
    old = np.random.default_rng(4)
    val = sorted(i for c in range(3) for i in old.permutation(np.flatnonzero(labels == c))[:2].tolist())
    assert digits_split(labels, 0.2, 4)[1].tolist() == val
    assert class_style(2, 1)["theta"] == np.random.default_rng([2, 1_000_003, 1]).uniform(0, np.pi)


def test_keys_are_checked_and_numpy_ints_are_plain_ints():
    with pytest.raises(TypeError, match=r"\(seed, epoch\)"):
        rng("shard_order", 5)
    with pytest.raises(KeyError, match="no random stream 'shard-order'"):
        rng("shard-order", 5, 1)
    with pytest.raises(TypeError):
        rng("shard_order", 5, 1.0)
    assert np.array_equal(
        rng("kmeans_sample", np.int64(5), np.uint32(6)).random(4), rng("kmeans_sample", 5, 6).random(4)
    )
    with pytest.raises(ValueError, match="salt"):
        Stream("x", ("seed",), "doc", form="seed", salt=3)


# --- no seeded generator outside the table ------------------------------------------------------------------

SEEDERS = {"default_rng", "SeedSequence", "RandomState", "PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64"}
TORCH_SEEDERS = {"manual_seed", "manual_seed_all"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _via_table(arg: ast.AST) -> bool:
    return isinstance(arg, ast.Call) and _dotted(arg.func).split(".")[-1] == "seed_state"


def seeding_problems(source: str, where: str) -> list[str]:
    """Seeded generators built outside kmim/contract/streams.py: any numpy generator or seed sequence, and any
    manual_seed / np.random.seed / random.seed / random.Random whose seed is not `streams.seed_state(...)`."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        last = name.split(".")[-1]
        seeds = (
            last in SEEDERS
            or last in TORCH_SEEDERS
            or name in ("random.Random", "Random")
            or (last == "seed" and name.rsplit(".", 1)[0] in ("random", "np.random", "numpy.random"))
        )
        if not seeds:
            continue
        args = [*node.args, *(k.value for k in node.keywords)]
        if last not in SEEDERS and len(args) == 1 and _via_table(args[0]):
            continue
        literal = any(isinstance(n, ast.Constant) and type(n.value) is int for a in args for n in ast.walk(a))
        why = "a bare integer salt/seed" if literal else "a seed not drawn from the streams table"
        problems.append(
            f"{where}:{node.lineno}: {ast.get_source_segment(source, node)} ({why}; "
            "use kmim.contract.streams.rng / seed_state / torch_generator with a named stream)"
        )
    return problems


def test_the_scan_catches_bare_salts_and_lets_table_draws_through():
    bad = (
        "np.random.default_rng([seed, 7, epoch])",
        "np.random.default_rng(seed)",
        "torch.manual_seed(0)",
        "torch.Generator().manual_seed(cfg.seed)",
        "np.random.seed(cfg.seed + rank)",
        "random.Random(13)",
        "np.random.Generator(np.random.PCG64(3))",
    )
    found = seeding_problems("\n".join(bad), "x.py")
    assert [p.split(":")[1] for p in found] == ["1", "2", "3", "4", "5", "6", "7"]
    assert "bare integer" in found[0] and "not drawn from the streams table" in found[1]
    good = (
        'torch.manual_seed(streams.seed_state("model_init", cfg.seed))',
        'np.random.seed(seed_state("mixup", cfg.seed, rank))',
        'streams.rng("shard_order", seed, epoch).permutation(n)',
        "torch.Generator()",
        "rng.integers(7)",
    )
    assert seeding_problems("\n".join(good), "y.py") == []


def test_no_seeded_generator_is_built_outside_the_streams_table():
    files = [p for d in ("kmim", "pipeline", "trainer", "bench") for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 40
    problems = []
    for path in files:
        if path == ROOT / "kmim" / "contract" / "streams.py":
            continue
        problems += seeding_problems(path.read_text(), str(path.relative_to(ROOT)))
    assert not problems, "\n".join(problems)
