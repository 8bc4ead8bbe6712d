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
    """Read a checkpoint without unpickling code: anything but tensors and plain values is refused.

    Every failure is a ValueError (FileNotFoundError when there is no file) with one line naming the file: a
    pickle that would build other objects (and so could run code) is refused; a truncated, damaged or foreign
    file is reported as such. torch.save writes a zip archive whose entries carry a CRC-32 that torch.load does
    not check, so it is checked here first: a flipped bit in the weights is an error, not a silent NaN.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty checkpoint file (zero bytes)")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except Exception:  # not a whole zip archive (zipfile.BadZipFile, ...): torch.load says what it is below
        damaged = None
    if damaged is not None:
        raise ValueError(f"{path}: corrupted checkpoint ({damaged} fails its CRC-32 check)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or ["unpickling refused"]
        # torch's message is a page of advice around one line that says what was refused, e.g. "Trying to load
        # unsupported GLOBAL posix.system ..." or "Unsupported operand 149"
        boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
        first = next((line for line in lines if not line.startswith(boilerplate)), lines[0])
        raise ValueError(f"{path}: refused, it holds more than tensors and plain values, or is not a checkpoint "
                         f"at all ({first})") from None
    except Exception as e:  # torch.load's many ways of failing on a damaged file: RuntimeError, EOFError, KeyError...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: truncated or corrupted checkpoint ({first})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a training checkpoint (it holds a {type(state).__name__}, not a dict)")
    return state
