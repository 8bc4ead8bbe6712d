"""Device choice, seeding and mixed precision: the only place that knows which hardware we are on."""
from __future__ import annotations

import contextlib
import functools
import platform
import warnings

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
    """Whether to train in channels_last memory format: `--channels_last`/`--no-channels_last`, else on CPU
    (oneDNN's convolutions are faster in NHWC: measured, see docs/speed.md) and on CUDA (tensor cores want NHWC;
    not yet measured here: CUDA's replicate padding returns NCHW, so each padded convolution pays two layout
    copies; scripts/gpu_check.py times both layouts per script to settle it), unless `--compile`: inductor (torch
    2.14) expects replication_pad2d_backward to return a channels_last gradient for a channels_last input, but the
    CPU kernel returns a contiguous one and the compiled step fails an assertion."""
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
    """The autocast dtype for a device: bf16 where the GPU has it natively (compute capability 8 and up: A100,
    RTX 30xx, H100, ...), else fp16; None (off) off CUDA. Emulated bf16 does not count: below capability 8
    (T4, V100, RTX 20xx) cuDNN has no bf16 convolutions, although torch.cuda.is_bf16_supported() says yes."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def autocast(device: torch.device, enabled: bool = True):
    """Autocast to amp_dtype(device) on CUDA; nothing elsewhere, or when not `enabled` (--amp off)."""
    dtype = amp_dtype(device) if enabled else None
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def full_precision(device: torch.device):
    """Autocast off on `device`, even inside a caller's autocast: verdicts, scores, calibration and stamping run
    in fp32 on every device, as Smooth and the attacks do, so that a threshold calibrated on one device holds on
    another (TF32, on by default for cuDNN convolutions, still applies on CUDA)."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)


@functools.lru_cache(maxsize=256)
def constant(values: tuple, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor of the nested tuple `values` on `device` in `dtype`, made once per (values, device, dtype): a
    tensor built from Python data is a blocking host-to-device copy on a GPU, so a training step must not build
    one each time. Never modify the result in place (it is shared). Made outside inference mode, so that a
    constant first asked for under torch.inference_mode can later take part in autograd."""
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype).to(device)


def rng_state() -> dict:
    """Generator states as plain tensors, so that a checkpoint can hold them under weights_only loading."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


_warned_cuda_rng = False


def set_rng_state(state: dict) -> None:
    """Restore rng_state()'s generators. The CUDA ones only when this process sees as many GPUs as the one that
    saved them; otherwise they keep their seeding, and a warning (once per process) says so."""
    global _warned_cuda_rng
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        elif not _warned_cuda_rng:
            _warned_cuda_rng = True
            warnings.warn(f"the checkpoint holds the random state of {len(state['cuda'])} GPU(s), this process sees "
                          f"{torch.cuda.device_count()}: the CUDA generators are not restored (they keep this run's "
                          f"seeding), so GPU random draws differ from an uninterrupted run", stacklevel=2)


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
