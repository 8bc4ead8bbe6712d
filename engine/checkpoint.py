"""Training checkpoints: tensors and plain values only, written atomically, read with weights_only=True."""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

from .distributed import Dist, all_gather_object, broadcast_object


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


def load_resume_checkpoint(path, d: Dist = Dist()) -> dict | None:
    """The checkpoint a run resumes from, or None to start at step 0.

    A single process reads `path` if it exists: nothing else, no collective. Under torchrun rank 0 decides: it
    reads its `path` and broadcasts the step it resumes from (or that it starts afresh); every other rank reads
    its own `path` and must find a checkpoint at that same step, or none when rank 0 has none. The verdicts are
    gathered, so a rank that disagrees makes every rank raise the same one-line ValueError instead of hanging: on
    several nodes without a shared results folder the other nodes see no checkpoint, would start at step 0 and
    run more steps than rank 0, waiting for it in a collective that never comes.

    Why each rank reads its own file rather than rank 0 broadcasting its checkpoint: every rank needs the whole
    state (DDP copies rank 0's weights and buffers, but not Adam's moments, the schedule, the loss scale or the
    rank's own random stream), and that state is large (the weights three times over, with Adam's two
    moments: 142 MB for one of this project's runs), which broadcast_object_list would pickle and push through
    the process group (through GPU memory with nccl) at every start, and the other ranks would unpickle without
    load_checkpoint's weights_only and CRC checks. The
    existing reading path stays as it was on every rank; the check costs two small collectives (the step, then
    one verdict per rank) and turns the hang into one line that names the rank and what it lacks.
    """
    path = Path(path)
    if not d.enabled:
        return load_checkpoint(path) if path.exists() else None
    checkpoint, error, decision = None, None, None
    if d.is_main:
        try:
            checkpoint = load_checkpoint(path) if path.exists() else None
            decision = ("step", None if checkpoint is None else int(checkpoint["step"]))
        except Exception as e:  # the others are waiting in the broadcast: tell them, then raise here
            error, decision = e, ("error", f"{type(e).__name__}: {e}")
    decision = broadcast_object(d, decision)
    if error is not None:
        raise error
    if decision[0] == "error":
        raise ValueError(f"rank 0 cannot read the checkpoint it would resume from ({decision[1]})")
    step = decision[1]
    problem = None
    if not d.is_main:
        fix = ("give every node the same results folder (--results_dir on shared storage) or copy rank 0's "
               "checkpoints/last.pt")
        try:
            checkpoint = load_checkpoint(path) if path.exists() else None
        except Exception as e:
            problem = f"rank {d.rank} cannot read {path} ({e}) while rank 0 resumes from step {step}: {fix}"
        mine = None if checkpoint is None else checkpoint.get("step")
        if problem is not None or mine == step:
            pass  # unreadable (said above), or the same checkpoint as rank 0's
        elif step is None:
            problem = (f"rank {d.rank} sees a checkpoint at step {mine} ({path}) but rank 0 sees none and would start "
                       f"at step 0: {fix}, or remove the stale one")
        elif mine is None:
            problem = f"rank {d.rank} sees no checkpoint at step {step} that rank 0 resumes from ({path}): {fix}"
        else:
            problem = (f"rank {d.rank} sees a checkpoint at step {mine} ({path}), not the one at step {step} that "
                       f"rank 0 resumes from: {fix}")
    problems = [p for p in all_gather_object(d, problem) if p]
    if problems:
        more = f" (and {len(problems) - 1} other rank(s) likewise)" if len(problems) > 1 else ""
        raise ValueError(problems[0] + more)
    return checkpoint
