"""Counting the host-device synchronisations of a piece of code: on CUDA (exact) and on CPU (a simulation that the
tests run), and what CUDA itself reports (torch.cuda.set_sync_debug_mode).

A CUDA step runs ahead of the host until something makes one wait for the other:

- literal: a tensor built from Python data for the device (`torch.tensor(..., device=...)`, `x.new_tensor(...)`,
  `torch.as_tensor(0.5, device=...)`): a blocking copy from pageable host memory, which waits for the device;
- read: a device value read by the host (`.item()`, `float(t)`, `bool(t)`, `nonzero`, boolean-mask indexing,
  `unique`, `repeat_interleave` without its output size);
- copy: a blocking host-to-device copy of an existing tensor (`.to(device)` without non_blocking and pinned memory).

`HostSyncCounter(device)` counts them. On a non-CPU device it counts, in torch's dispatcher, exactly the operations
on that device's tensors. On CPU every tensor is a host tensor, so it simulates a GPU: a literal counts when the
code asks for it on a device (`device=` given, or `new_tensor` of a device tensor); a read counts unless its
tensor lives on the host by design. Host tensors are those built without a device (`torch.tensor(data)`, e.g.
kornia's host copy of a blur's sigma), one-element draws of a random factory without tensor inputs (the original
chain's `float(torch.rand(()))` coin flips, on the CPU generator on purpose), the tensors passed as `host` (e.g. a
non-fused Adam's step counts, which torch keeps on the CPU), and whatever is computed from host tensors alone.
Code that branches on `device.type == "cpu"` runs its CPU branch here: keep such branches free of reads.
"""
from __future__ import annotations

import collections
import contextlib
import traceback
import warnings
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

#: torch.tensor / torch.as_tensor / Tensor.new_tensor of Python data end in lift_fresh (the data is put on the
#: target device before it, outside the dispatcher)
_LITERAL = {aten.lift_fresh.default, aten.lift_fresh_copy.default}
_READ = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, aten.equal.default,
         aten.is_nonzero.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
         aten.repeat_interleave.Tensor}
_RANDOM_FACTORIES = {aten.rand.default, aten.randn.default, aten.randint.default, aten.randint.low,
                     aten.randperm.default, aten.rand.generator, aten.randn.generator, aten.randint.generator,
                     aten.randint.low_generator, aten.randperm.generator}
_TORCH_DIR = str(Path(torch.__file__).parent)


def _tensors(values):
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _tensors(v)


def _site() -> str:
    """The innermost caller outside torch and this module: the line to change (or the library that forces it)."""
    for frame in reversed(traceback.extract_stack()):
        if not frame.filename.startswith(_TORCH_DIR) and frame.filename != __file__:
            return f"{'/'.join(Path(frame.filename).parts[-3:])}:{frame.lineno} {frame.name}"
    return "?"


class HostSyncCounter(TorchDispatchMode):
    """Counts literal device tensors, host reads and blocking copies while active (see the module's docstring).

        with HostSyncCounter(device, host=...) as counter:
            trainer.step(x, step)
        counter.total, counter.counts   # e.g. 3, Counter({'literal': 3})
        print(counter.report())         # 2× literal at kornia/color/yuv.py:63 rgb_to_yuv, ...

    `device`: where the code runs; a CPU device (or None) simulates a GPU. `host`: tensors that live on the host by
    design (simulation only).
    """

    def __init__(self, device: torch.device | str | None = None, host=()):
        super().__init__()
        self.simulate = device is None or torch.device(device).type == "cpu"
        self.counts = collections.Counter()
        self.sites = collections.Counter()
        self._host: dict[int, weakref.ref] = {}
        for t in host:
            self._mark_host(t)
        self._patches = contextlib.ExitStack()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def report(self) -> str:
        """One line per site, most frequent first: 'N× kind at file:line function'."""
        return "\n".join(f"{n}× {kind} at {site}" for (kind, site), n in self.sites.most_common())

    # ------------------------------------------------------------------ bookkeeping
    def _count(self, kind: str) -> None:
        self.counts[kind] += 1
        self.sites[(kind, _site())] += 1

    def _mark_host(self, t) -> None:
        if isinstance(t, torch.Tensor):
            self._host[id(t)] = weakref.ref(t)

    def _is_host(self, t: torch.Tensor) -> bool:
        ref = self._host.get(id(t))
        return ref is not None and ref() is t

    # ------------------------------------------------------------------ the literals' intent (simulation)
    def __enter__(self):
        if self.simulate:
            counter = self
            tensor, as_tensor, new_tensor = torch.tensor, torch.as_tensor, torch.Tensor.new_tensor

            def literal(make, data, for_device, *args, **kwargs):
                out = make(data, *args, **kwargs)
                if for_device:
                    counter._count("literal")
                else:
                    counter._mark_host(out)
                return out

            def tensor_(data, *args, **kwargs):
                return literal(tensor, data, kwargs.get("device") is not None, *args, **kwargs)

            def as_tensor_(data, *args, **kwargs):
                if isinstance(data, torch.Tensor):
                    return as_tensor(data, *args, **kwargs)
                return literal(as_tensor, data, kwargs.get("device") is not None, *args, **kwargs)

            def new_tensor_(self_, data, *args, **kwargs):
                return literal(lambda d, *a, **k: new_tensor(self_, d, *a, **k), data, not counter._is_host(self_),
                               *args, **kwargs)

            for owner, name, fn in ((torch, "tensor", tensor_), (torch, "as_tensor", as_tensor_),
                                    (torch.Tensor, "new_tensor", new_tensor_)):
                self._patches.enter_context(_patched(owner, name, fn))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._patches.close()

    # ------------------------------------------------------------------ the dispatcher
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = list(_tensors(args)) + list(_tensors(kwargs.values()))
        if func in _LITERAL:
            if not self.simulate and inputs[0].device.type != "cpu":
                self._count("literal")
            elif self.simulate and self._is_host(inputs[0]):
                self._mark_host(out)
        elif func in _READ:
            if (inputs[0].device.type != "cpu") if not self.simulate else not self._is_host(inputs[0]):
                self._count("read")
        elif func in (aten._to_copy.default, aten.copy_.default) and not self.simulate:
            # asynchronous only from pinned memory with non_blocking
            src, dst = (inputs[1], inputs[0]) if func is aten.copy_.default else (inputs[0], out)
            non_blocking = kwargs.get("non_blocking", args[2] if func is aten.copy_.default and len(args) > 2
                                      else False)
            if src.device.type == "cpu" and dst.device.type != "cpu" and not (non_blocking and src.is_pinned()):
                self._count("copy")
        elif self.simulate:
            if inputs and all(self._is_host(t) for t in inputs):
                for t in _tensors(out if isinstance(out, (list, tuple)) else [out]):
                    self._mark_host(t)
            elif not inputs and func in _RANDOM_FACTORIES and out.numel() == 1:
                self._mark_host(out)
        return out


@contextlib.contextmanager
def _patched(owner, name, value):
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def optimizer_host_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The step counts a non-fused, non-capturable optimizer keeps on the CPU by design (HostSyncCounter's host)."""
    return [state["step"] for group in optimizer.param_groups if not (group.get("fused") or group.get("capturable"))
            for p in group["params"] for state in [optimizer.state.get(p, {})] if torch.is_tensor(state.get("step"))]


@contextlib.contextmanager
def cuda_sync_warnings(device: torch.device):
    """What CUDA reports as synchronising (torch.cuda.set_sync_debug_mode('warn')) while the block runs: yields a
    list that holds one message per synchronisation once the block ends. An empty list on other devices."""
    found: list[str] = []
    if torch.device(device).type != "cuda":
        yield found
        return
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    found.extend(str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower())
