"""How long each corruption, the whole chain and --aug_resample's resampling take per batch, forward and backward.

    python -m augment.benchmark                 # 32×128² and 8×400² batches on the default device
    python -m augment.benchmark --batch 8       # 8 images per batch at every size
    python -m augment.benchmark --quick         # 2 repeats, 2 images per batch
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from engine.cli import HelpFormatter, positive_int
from engine.device import pick_device

from .chain import StochasticChain
from .registry import CORRUPTIONS, build, parse_names
from .resample import PlatformResampling

#: --aug_resample's rows: label → (photo size, factor, filter) for PlatformResampling.apply
RESAMPLE_ROWS = {
    **{f"resample: photo 1×, ×0.75 {f}": (1.0, 0.75, f) for f in ("area", "bilinear", "bicubic", "lanczos")},
    "resample: photo ½×, ×2 lanczos (read at 2×)": (0.5, 2.0, "lanczos"),
    "resample: stamp.py's round trip at 2×": (2.0, 1.0, "lanczos"),
    "resample: stamp.py's round trip at 4×": (4.0, 1.0, "lanczos"),
    "resample: round trip at 4×, ×0.5 lanczos": (4.0, 0.5, "lanczos"),
}
#: seeded draws of --aug_resample timed once each, their mean the expected cost per batch
RESAMPLE_DRAWS = 24


def time_ms(fn, repeats: int, device, warmup: bool = True) -> float:
    """Median wall time of fn() in ms over `repeats` runs after one warm-up (unless not `warmup`), waiting for CUDA
    each time."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure(size: int, batch: int, device, repeats: int) -> list[tuple[str, float]]:
    """[(label, median ms per batch)] for every corruption at full strength, the chain, and --aug_resample (a few
    fixed settings, and the mean over seeded draws: what a batch costs on average)."""
    x = torch.rand(batch, 3, size, size, device=device)

    def forward_backward(module):
        def run():
            xg = x.clone().requires_grad_()
            module(xg).sum().backward()
        return run

    rows = []
    for name in CORRUPTIONS:
        rows.append((f"{name} (train)", time_ms(forward_backward(build(name, "train")), repeats, device)))
    with torch.no_grad():
        real = build("jpeg", "eval")
        rows.append(("jpeg (eval, Pillow, forward only)", time_ms(lambda: real(x), repeats, device)))
    every = len(parse_names("all"))
    for p in (0.5, 1.0):
        chain = StochasticChain.from_names("all", "train", p=p)
        rows.append((f"chain of all {every} ('all'), p={p}", time_ms(forward_backward(chain), repeats, device)))
    for label, setting in RESAMPLE_ROWS.items():
        rows.append((label, time_ms(forward_backward(lambda v, s=setting: PlatformResampling.apply(v, *s)),
                                    repeats, device)))
    resample, times = PlatformResampling(), []
    for seed in range(RESAMPLE_DRAWS if repeats > 2 else 2):
        torch.manual_seed(seed)
        setting = resample.draw()
        times.append(time_ms(forward_backward(lambda v, s=setting: PlatformResampling.apply(v, *s)), 1, device,
                             warmup=False))
    rows.append((f"--aug_resample, mean of {len(times)} draws", statistics.mean(times)))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed runs per entry (median reported)")
    parser.add_argument("--sizes", type=positive_int, nargs="+", default=[128, 400],
                        help="image sides to time; the batch is 32 images at ≤ 128 px and 8 above")
    parser.add_argument("--batch", type=positive_int, default=None,
                        help="images per batch at every size (default: 32 at ≤ 128 px, 8 above)")
    parser.add_argument("--quick", action="store_true", help="2 images per batch and 2 repeats: a smoke test")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    repeats = 2 if args.quick else args.repeats
    settings = [(size, 2 if args.quick else args.batch or (32 if size <= 128 else 8)) for size in args.sizes]
    results = {f"{b}×{s}²": dict(measure(s, b, device, repeats)) for s, b in settings}
    columns = list(results)
    print(f"ms per batch, forward + backward, median of {repeats}, on {device} ({torch.get_num_threads()} threads)")
    print("| corruption | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for label in results[columns[0]]:
        print(f"| {label} | " + " | ".join(f"{results[c][label]:.1f}" for c in columns) + " |")
    return results


if __name__ == "__main__":
    main()
