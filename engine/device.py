"""Device choice, seeding and mixed precision: the only place that knows which hardware we are on."""
from __future__ import annotations

import contextlib
import platform

import torch


def pick_device(name: str = "auto") -> torch.device:
    """'auto' → cuda, then mps, then cpu; anything else is passed to torch.device and checked."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (try --device auto)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine (try --device auto)")
    return device


def configure_speed(device: torch.device) -> None:
    """Process-wide settings for fast training on `device` (the training loop and bench.py call this).

    CUDA: cuDNN autotuning (training crops have one size) and TF32 for the fp32 matrix products left outside
    autocast. CPU: nothing. Flushing denormals to zero (torch.set_flush_denormal) was measured and left out: on
    this project's 2-core AMD EPYC it changed neither a train_rs_aug.py step (128², fresh or after 300 steps) nor
    kornia's rotation/crop backward, even with gradients forced into the denormal range.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def use_channels_last(args, device: torch.device) -> bool:
    """Whether to train in channels_last memory format: `--channels_last`/`--no-channels_last`, else on CUDA
    (tensor cores want NHWC) and on CPU (oneDNN's convolutions are faster in NHWC; see README, bench), unless
    `--compile`: inductor (torch 2.14) expects replication_pad2d_backward to return a channels_last gradient for a
    channels_last input, but the CPU kernel returns a contiguous one and the compiled step fails an assertion."""
    choice = getattr(args, "channels_last", None)
    if choice is not None:
        return bool(choice)
    if getattr(args, "compile", False):
        return False
    return device.type in ("cuda", "cpu")


def seed_everything(seed: int) -> None:
    """Seed torch's CPU and CUDA generators; training draws all its randomness from them."""
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a device: bf16 where CUDA supports it, else fp16; None (off) off CUDA."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, enabled: bool = True):
    """Autocast to amp_dtype(device) on CUDA; nothing elsewhere, or when not `enabled` (--amp off)."""
    dtype = amp_dtype(device) if enabled else None
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def rng_state() -> dict:
    """Generator states as plain tensors, so that a checkpoint can hold them under weights_only loading."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
