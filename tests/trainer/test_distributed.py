from kmim.trainer.distributed import env_ranks, shards_for, split_evenly


def test_env_ranks_from_torchrun_slurm_or_nothing():
    assert env_ranks({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == (3, 8, 1)
    assert env_ranks({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}) == (5, 16, 1)
    assert env_ranks({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "9", "SLURM_NTASKS": "16"}) == (0, 2, 0)
    assert env_ranks({}) == (0, 1, 0)


def test_shards_for_covers_every_shard_once_per_epoch_when_enough():
    order = [4, 2, 7, 0, 1, 3, 6, 5, 8, 9, 10]
    slices = [shards_for(11, r, 2, w, 2, order) for r in range(2) for w in range(2)]
    flat = sorted(s for sl in slices for s in sl)
    assert flat == sorted(order)
    assert max(map(len, slices)) - min(map(len, slices)) <= 1


def test_shards_for_wraps_when_there_are_fewer_shards_than_slots():
    slices = [shards_for(3, r, 4, w, 2, [2, 0, 1]) for r in range(4) for w in range(2)]
    assert all(len(s) == 1 for s in slices) and {s[0] for s in slices} == {0, 1, 2}


def test_split_evenly():
    assert [split_evenly(10, 3, i) for i in range(3)] == [4, 3, 3]
    assert sum(split_evenly(7, 4, i) for i in range(4)) == 7
