"""Fuzz the image decoder and the shard reader with random truncations and byte flips of real shards.

Bounded in time. Allowed outcomes: the whole shard is refused with ShardReadError (a documented error naming
the file), or it is read and every sample whose header survived is either produced or listed as a skip.
"""

import random
import tarfile
import time

from kmim.data.reader import ReadStats, iter_images, open_dataset
from kmim.data.synthetic import SyntheticConfig, write_synthetic
from kmim.errors import ShardReadError

BUDGET_S = 20.0


def _layout(path):
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    headers = [(m.offset, m.offset_data) for m in members]
    keys = sorted({m.name.split(".", 1)[0] for m in members})
    return headers, keys


def test_truncated_and_flipped_shards_fail_cleanly_or_lose_nothing_silently(tmp_path):
    write_synthetic(
        str(tmp_path / "d"), SyntheticConfig(num_images=24, image_size=16, shard_size=24, format="jpg")
    )
    original = next((tmp_path / "d").glob("*.tar"))
    pristine = original.read_bytes()
    headers, keys = _layout(original)
    rng = random.Random(0)
    start, rounds, outcomes = time.monotonic(), 0, {"refused": 0, "read": 0}
    while time.monotonic() - start < BUDGET_S and rounds < 400:
        rounds += 1
        data = bytearray(pristine)
        if rng.random() < 0.3:
            data = data[: rng.randrange(1, len(data))]
            in_data = False
        else:
            flips = [rng.randrange(len(data)) for _ in range(rng.randint(1, 8))]
            for at in flips:
                data[at] ^= 1 << rng.randrange(8)
            in_data = all(
                any(d <= at < h2 for (_, d), (h2, _) in zip(headers, headers[1:] + [(len(data), 0)]))
                for at in flips
            )
        shard = tmp_path / "f.tar"
        shard.write_bytes(bytes(data))
        stats = ReadStats()
        try:
            produced = [s.key for ref in open_dataset(str(shard)).shards for s, _ in iter_images(ref, stats)]
        except ShardReadError as e:
            assert str(shard) in str(e)
            outcomes["refused"] += 1
            continue
        outcomes["read"] += 1
        if in_data:  # headers intact: every sample is accounted for
            assert sorted(produced + [s["key"] for s in stats.skipped]) == keys
    assert rounds >= 20 and outcomes["refused"] and outcomes["read"], outcomes
