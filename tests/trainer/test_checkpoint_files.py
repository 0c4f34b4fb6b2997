"""Checkpoint files: one naming rule for writer, lister and cleaner; unreadable files are one clear error."""

import io
import pickle

import pytest
import torch

from kmim.errors import InputError
from kmim.trainer.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint


class Payload:  # an arbitrary object: loading it would need unpickling code
    pass


def test_a_temporary_left_by_a_killed_write_is_never_taken_for_a_checkpoint(tmp_path):
    save_checkpoint(str(tmp_path), 10, {"model": {"w": torch.ones(2)}}, keep=2)
    (tmp_path / "_tmp.0123456789ab.checkpoint-00000020.pt").write_bytes(
        b"\x80\x02half a checkpo"
    )  # SIGKILL here
    (tmp_path / "old-checkpoint-00000030.pt").write_bytes(b"")
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [10]
    state = load_checkpoint(list_checkpoints(str(tmp_path))[-1][1])
    assert torch.equal(state["model"]["w"], torch.ones(2))


def test_unreadable_checkpoints_are_one_line_naming_the_file(tmp_path):
    good = save_checkpoint(str(tmp_path), 1, {"model": {"w": torch.zeros(1000)}}, keep=5)
    truncated = tmp_path / "checkpoint-00000002.pt"
    truncated.write_bytes(open(good, "rb").read()[:300])
    with pytest.raises(
        InputError, match=r"checkpoint-00000002\.pt: is not a readable checkpoint \(truncated"
    ):
        load_checkpoint(str(truncated))

    buf = io.BytesIO()
    torch.save({"model": Payload()}, buf, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    pickled = tmp_path / "checkpoint-00000003.pt"
    pickled.write_bytes(buf.getvalue())
    with pytest.raises(InputError, match="holds pickled Python objects") as e:
        load_checkpoint(str(pickled))
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)


def test_disk_full_during_a_checkpoint_write_is_one_line_and_keeps_the_earlier_ones(tmp_path, monkeypatch):
    from kmim import fs

    save_checkpoint(str(tmp_path), 1, {"model": {"w": torch.zeros(1)}}, keep=5)

    def full(url, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fs, "write_bytes_atomic", full)
    with pytest.raises(InputError, match="No space left on device"):
        save_checkpoint(str(tmp_path), 2, {"model": {"w": torch.zeros(1)}}, keep=5)
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [1]
