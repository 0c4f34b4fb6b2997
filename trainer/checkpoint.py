"""Training checkpoints: atomic, the latest k kept, loadable with `torch.load(weights_only=True)`.

A checkpoint holds only tensors and plain Python values: model, optimizer and scheduler state, the
step / epoch / batch position, RNG states, and the resolved config as a JSON string.
"""

from __future__ import annotations

import io
import pickle
import posixpath
import random
import re

import numpy as np
import torch

from kmim import __version__, fs
from kmim.errors import InputError

# The one naming rule, used by the writer, the lister and the cleaner: a finished checkpoint is exactly
# `checkpoint-<step:08d>.pt`; the temporary name a killed write leaves (`_tmp.<id>.checkpoint-...`) never matches.
PATTERN = re.compile(r"checkpoint-(\d{8})\.pt")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}.pt"


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    filesystem, path = fs.get_fs(run_dir)
    if not filesystem.exists(path):
        return []
    found = []
    for p in filesystem.ls(path, detail=False):
        m = PATTERN.fullmatch(posixpath.basename(p))
        if m:
            found.append((int(m.group(1)), fs.join(run_dir, posixpath.basename(p))))
    return sorted(found)


def save_checkpoint(run_dir: str, step: int, payload: dict, keep: int) -> str:
    url = fs.join(run_dir, checkpoint_name(step))
    buf = io.BytesIO()
    torch.save({**payload, "kmim_version": __version__}, buf)
    try:
        fs.write_bytes_atomic(url, buf.getvalue())
    except OSError as e:  # disk full, permissions: the previous checkpoints are intact
        raise InputError(
            url, f"cannot write the checkpoint ({e.strerror or e}); the earlier ones are kept"
        ) from None
    for _, old in list_checkpoints(run_dir)[:-keep]:
        fs.remove(old)
    return url


def load_checkpoint(url: str) -> dict:
    """A checkpoint's tensors and plain values; never unpickles objects (`weights_only=True`)."""
    filesystem, path = fs.get_fs(url)
    try:
        state = torch.load(io.BytesIO(filesystem.cat_file(path)), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise InputError(
            url,
            "holds pickled Python objects, not a kmim checkpoint of tensors and plain values; "
            "it is not loaded (kmim never unpickles objects)",
        ) from None
    except (EOFError, RuntimeError, ValueError, OSError) as e:
        raise InputError(
            url, f"is not a readable checkpoint (truncated or corrupt: {type(e).__name__})"
        ) from None
    if not isinstance(state, dict) or "model" not in state:
        raise InputError(url, "is not a kmim checkpoint (no 'model' state)")
    return state
