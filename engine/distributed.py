"""Data-parallel training under torchrun: the process group, this process's rank, and the few collectives the
training loop needs.

`torchrun --nproc_per_node=N train.py ...` sets RANK, WORLD_SIZE and LOCAL_RANK for each of its N processes; a
plain `python train.py ...` sets none of them and runs as a single process (rank 0 of 1), with no process group
and no collective calls at all. Backends: nccl on CUDA (one GPU per process: cuda_device), gloo on CPU.
"""
from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .device import pick_device


@dataclass(frozen=True)
class Dist:
    """Where this process stands: rank (0 .. world_size-1), world_size, local_rank (the GPU it drives on its
    node); `enabled` when torchrun started it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, validates, writes checkpoints and exports weights."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device_name: str = "auto") -> tuple[Dist, torch.device]:
    """(Dist, device) for this process, joining the process group when torchrun started it.

    Under torchrun, `--device auto` or `cuda` means cuda_device(LOCAL_RANK); a device index is refused when there is
    more than one process per node (they would all share that GPU), and MPS is refused (no backend supports it).
    A process group that already exists (a caller that set one up itself) is used as it is.
    """
    if not launched_by_torchrun():
        return Dist(), pick_device(device_name)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    device = pick_device(device_name)
    if device.type == "cuda":
        if device.index is None:
            device = cuda_device(local_rank)
        elif local_world > 1:
            raise ValueError(f"--device {device_name}: under torchrun each process takes the GPU of its local rank; "
                             f"use --device cuda (or auto), not one GPU for all {local_world} processes")
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"--device {device_name}: data-parallel training (torchrun) runs on cuda (nccl) or cpu "
                         f"(gloo), not {device.type}")
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world,
                                device_id=device if device.type == "cuda" else None)
    return Dist(rank, world, local_rank, enabled=True), device


def cuda_device(local_rank: int) -> torch.device:
    """The GPU of the process with this LOCAL_RANK: cuda:LOCAL_RANK when the process sees every GPU of its node
    (torchrun's usual case), cuda:(LOCAL_RANK mod the visible count) otherwise; with one process per GPU each
    seeing only its own (SLURM --gpus-per-task=1, or CUDA_VISIBLE_DEVICES set per process) that is cuda:0."""
    return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))


def teardown(d: Dist) -> None:
    """Leave the process group (local: it waits for no other rank)."""
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_object(d: Dist, obj) -> list:
    """[obj of rank 0, obj of rank 1, ...]: a collective, every rank must call it; [obj] for a single process."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(d: Dist, obj, src: int = 0):
    """Rank `src`'s obj on every rank (a collective: every rank calls it, the others' obj is ignored); obj itself
    for a single process. For small picklable values: it goes through pickle, as all_gather_object."""
    if not d.enabled:
        return obj
    box = [obj if d.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(d: Dist, values: torch.Tensor) -> torch.Tensor:
    """The mean of `values` over the ranks (a collective; the tensor itself for a single process)."""
    if not d.enabled:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / d.world_size


def all_reduce_max(d: Dist, values: torch.Tensor) -> torch.Tensor:
    if not d.enabled:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's or `kill`'s polite stop), turned into a request that the training
    loop honours at the end of a step, where the state is consistent.

    A signal arriving mid-step, or mid-save, must not leave a half-updated model behind; and under torchrun, which
    forwards SIGINT and SIGTERM to every process, one rank gone from the middle of a collective leaves the others
    waiting in it. So the first signal only sets a flag (and remembers which signal it was): a single process
    checks it after every step, a data-parallel run shares the flags at its next log interval (where it
    synchronises anyway) and every rank leaves there; rank 0 writes a checkpoint. A second signal stops at once,
    unsaved (KeyboardInterrupt): the previous checkpoint stays as it was, since checkpoints are written atomically.
    Handlers can only be installed from the main thread; elsewhere nothing is installed.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, d: Dist):
        self.requested = False
        self.signum: int | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    @property
    def name(self) -> str:
        """The signal's name, e.g. 'SIGTERM' ('a stop request' when the flag came from a peer rank)."""
        return signal.Signals(self.signum).name if self.signum is not None else "a stop request"

    @property
    def exit_status(self) -> int:
        """128 + the signal's number, the shell's convention (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + (self.signum if self.signum is not None else signal.SIGINT)

    def _handle(self, signum, frame):
        if self.requested:  # the second one: do not wait any longer
            self.restore()
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
