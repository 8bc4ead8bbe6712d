"""Training checkpoints: tensors and plain values only, written atomically, read with weights_only=True."""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch


def save_checkpoint(state: dict, path) -> Path:
    """Write `state` to `path` through a temporary file and a rename: a crash, even mid-write, leaves the
    previous checkpoint whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint without unpickling code: anything but tensors and plain values is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unpickling refused"
        raise ValueError(f"{path}: refused, it holds more than tensors and plain values ({first})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: truncated or corrupted checkpoint ({str(e).splitlines()[0]})") from None
