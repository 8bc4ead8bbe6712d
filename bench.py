"""How fast this machine trains, scans, stamps and certifies, beside how fast Pillow decodes the same photos.

    python bench.py                  # this machine, the default device (cuda, then mps, then cpu)
    python bench.py --compare        # also with the speed features off ("before") and the ratio after/before
    python bench.py --quick          # tiny sizes, one run each: a smoke test (what tests/test_bench.py runs)

Every number is the median over --repeats timed runs after one warm-up run, before and after taking turns run by
run (so that a passing load on a shared machine hits both); an entry whose warm-up alone took longer than
--budget seconds is reported from that one run (marked ¹). Training runs the real training step of
each script (engine.training.Trainer with the script's own flags and views; train_rs_aug.py with its augmented
view at full strength) on random crops of the photos scikit-image ships, without the data loader, so that the
figures are the models' speed; the Pillow row tells how fast one core can decode the same photos to feed them.
The scan.py rows time the product itself: one JPEG file judged by a shipped model at its shipped calibration
(`baseline`, plain; `rs_aug`, smoothed), reading included, as `scan.py` does it at its defaults.
Peak memory is the process's resident memory (CPU) or the largest CUDA allocation during the entry.

"before" (--compare) is torch's defaults: no channels_last (`--no-channels_last`), no cuDNN autotuning and no TF32
matrix products on CUDA (cuDNN's convolutions use TF32 in both, as torch does by default), and Smooth's sampling
without its reused buffer and chunks (`reference_counts`). Fused Adam on CUDA stays on in both. "after" is what
train.py, train_rs.py, train_rs_aug.py and smoothing.certify do by default. Scanning and stamping run in fp32, as
scan.py and stamp.py do.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import statistics
import sys
import time

import torch
from PIL import Image

from datasets.images import load_rgb, to_tensor
from datasets.samples import sample_photo_paths
from engine.cli import HelpFormatter, positive_int, positive_float
from engine.device import configure_speed, cpu_name, full_precision, pick_device
from engine.training import Trainer
from models import Scanner, ScannerConfig, StampEncoder
from models.scanner import ARCHS
from smoothing import Smooth

SCRIPTS = ("train", "train_rs", "train_rs_aug")
#: 12 megapixels, a phone photo (4:3)
MEGAPIXEL_12 = (3000, 4000)


# ------------------------------------------------------------------------------------------------ timing
class PeakMemory:
    """Peak memory in MB while the `with` block runs: CUDA's largest allocation, or the process's peak resident
    set size (Linux: VmHWM, reset through /proc/self/clear_refs; elsewhere the lifetime peak, ru_maxrss)."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb = device, float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets the peak RSS to the current one
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.peak_mb = self._peak_rss() / 2**20

    @staticmethod
    def _peak_rss() -> int:
        try:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def once(fn, device: torch.device) -> float:
    """Wall seconds of one call of fn(), waiting for CUDA before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(make, modes, device: torch.device, repeats: int, budget_s: float) -> dict:
    """{mode: (median seconds per call, timed runs, peak MB, work per call)} for make(mode) → (fn, work).

    Each mode's function is built and run once (warm-up), then the modes take turns, run by run, so that a load
    that comes and goes on a shared machine falls on before and after alike. A mode whose warm-up took longer
    than budget_s is reported from its warm-up alone.
    """
    built, warm, times, peaks = {}, {}, {m: [] for m in modes}, dict.fromkeys(modes, 0.0)

    def run(mode):
        with speed_features(device, mode), PeakMemory(device) as memory:
            seconds = once(built[mode][0], device)
        peaks[mode] = max(peaks[mode], memory.peak_mb)
        return seconds

    for mode in modes:
        with speed_features(device, mode):
            built[mode] = make(mode)
        warm[mode] = run(mode)
    for _ in range(repeats):
        for mode in modes:
            if warm[mode] <= budget_s:
                times[mode].append(run(mode))
    return {m: (statistics.median(times[m] or [warm[m]]), len(times[m]) or 1, peaks[m], built[m][1]) for m in modes}


@contextlib.contextmanager
def speed_features(device: torch.device, on: bool):
    """The process-wide half of "after" (on) or "before" (off: torch's defaults, cuDNN's TF32 convolutions
    included); channels_last is passed to each entry."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if on:
        configure_speed(device)
    else:
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ------------------------------------------------------------------------------------------------ photos
def load_photos(max_photos: int = 6) -> list[torch.Tensor]:
    """The colour photos among scikit-image's samples, (3,H,W) in [0,1]."""
    photos = []
    for path in sample_photo_paths():
        image = load_rgb(path)
        pixels = to_tensor(image)
        if (pixels[0] - pixels[1]).abs().mean() > 0.01:  # skip the grey ones
            photos.append(pixels)
        if len(photos) == max_photos:
            break
    return photos


def square(photo: torch.Tensor, size: int) -> torch.Tensor:
    """Short side resized to `size`, then the centre square: (3,size,size)."""
    _, h, w = photo.shape
    scale = size / min(h, w)
    hw = (max(size, round(h * scale)), max(size, round(w * scale)))
    resized = torch.nn.functional.interpolate(photo[None], size=hw, mode="bilinear", antialias=True,
                                              align_corners=False)[0]
    top, left = (resized.shape[1] - size) // 2, (resized.shape[2] - size) // 2
    return resized[:, top:top + size, left:left + size].clamp(0, 1)


def resized(photo: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    return torch.nn.functional.interpolate(photo[None], size=hw, mode="bilinear", align_corners=False)[0].clamp(0, 1)


def training_batches(photos, size: int, batch: int, count: int = 4) -> list[torch.Tensor]:
    """`count` batches (batch,3,size,size) of random crops of the photos (each photo scaled so that its short
    side is 1.5×size first), as the data loader would give them."""
    g = torch.Generator().manual_seed(0)
    bases = [square(p, round(1.5 * size)) for p in photos]
    out = []
    for _ in range(count):
        crops = []
        for _ in range(batch):
            base = bases[int(torch.randint(len(bases), (), generator=g))]
            top, left = (int(torch.randint(base.shape[1] - size + 1, (), generator=g)) for _ in range(2))
            crops.append(base[:, top:top + size, left:left + size])
        out.append(torch.stack(crops))
    return out


# ------------------------------------------------------------------------------------------------ entries
def train_entry(script: str, size: int, batch: int, steps: int, scanner: str, device, channels_last: bool, photos,
                encoder_width: float = 1.0):
    """A function that runs `steps` training steps of `script`, and the images it trains on per call."""
    module = importlib.import_module(script)
    flags = ["--run_name", "bench", "--recipe", "robust", "--image_size", str(size), "--batch_size", str(batch), "--scanner", scanner,
             "--encoder_width", str(encoder_width), "--lps_w", "0", "--device", str(device),
             "--channels_last" if channels_last else "--no-channels_last"]
    if script == "train_rs_aug":
        flags += ["--aug_start", "0", "--aug_end", "0"]  # the augmented view at full strength from step 0
    _, args, views = module.parse(flags)
    trainer = Trainer(args, views, device, log=lambda *a: None)
    batches = [b.to(device) for b in training_batches(photos, size, batch)]
    state = {"step": 0}

    def run():
        for _ in range(steps):
            trainer.step(batches[state["step"] % len(batches)], state["step"])
            state["step"] += 1
        # the step is asynchronous on CUDA; once() synchronises
    return run, steps * batch


def scanner_entry(arch: str, size: int, batch: int, device, channels_last: bool, photos):
    scanner = Scanner(ScannerConfig(arch)).to(device).eval()
    x = torch.stack([square(photos[i % len(photos)], size) for i in range(batch)]).to(device)
    if channels_last:
        scanner = scanner.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def run():
        with full_precision(device):
            scanner(x)
    return run, batch


def stamp_entry(hw: tuple[int, int], device, channels_last: bool, photos):
    encoder = StampEncoder().to(device).eval()
    x = resized(photos[0], hw)[None].to(device)
    if channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def run():
        with full_precision(device):
            residual = encoder(x)
        (x + residual.float()).clamp(0, 1)
    return run, 1


def reference_counts(scanner, x: torch.Tensor, sigma: float, num: int, batch_size: int, generator) -> torch.Tensor:
    """Smooth._sample_counts without its reused buffer and chunks, for --compare's "before" (the same noise, the
    same counts)."""
    device = next(scanner.parameters()).device
    x = x.to(device)
    counts = None
    remaining = num
    with torch.no_grad():
        while remaining > 0:
            this = min(batch_size, remaining)
            noise = torch.randn((this, *x.shape), generator=generator, device=device, dtype=x.dtype)
            logits = scanner(x.unsqueeze(0) + sigma * noise.to(device))
            batch_counts = torch.bincount(logits.argmax(1), minlength=logits.shape[1])
            counts = batch_counts if counts is None else counts + batch_counts
            remaining -= this
    return counts.cpu()


def certify_entry(arch: str, size: int, n: int, batch: int, device, after: bool, photos):
    scanner = Scanner(ScannerConfig(arch)).to(device).eval()
    x = square(photos[0], size).to(device)
    smooth = Smooth(scanner, 0.5)

    def run():
        generator = torch.Generator(device).manual_seed(0)
        if after:
            smooth.counts(x, n, batch, generator)
        else:
            reference_counts(scanner, x, 0.5, n, batch, generator)
    return run, n


def smoothed_entry(arch: str, hw: tuple[int, int], n: int, batch: int, device, sequential: bool, photos,
                   count: int = 4):
    """Smoothed verdicts for `count` photos at the working size: Cohen's fixed-n PREDICT, one photo after the
    other, or sequential PREDICT (smoothing.sequential) with the photos sharing forward passes. The untrained
    scanner's votes are lopsided, as most real photos' are, so the sequential figure is the common case."""
    scanner = Scanner(ScannerConfig(arch)).to(device).eval()
    x = torch.stack([resized(photos[i % len(photos)], hw) for i in range(count)]).to(device)
    smooth = Smooth(scanner, 0.25)

    def run():
        generator = torch.Generator(device).manual_seed(0)
        if sequential:
            smooth.predict_sequential(x, n, 0.001, batch, generator)
        else:
            for image in x:
                Smooth.decide(smooth.counts(image, n, batch, generator), 0.001)
    return run, count


def scan_entry(model: str, image: torch.Tensor, device):
    """scan.py's verdict on one JPEG file (quality 90) of `image` with a shipped model at its shipped calibration
    (product.scanning.PhotoScanner at scan.py's defaults): decode, working size, judge. A fresh noise seed per run,
    as scan.py draws one from the operating system."""
    import tempfile

    from product.scanning import PhotoScanner, ScanSettings

    pixels = (image.permute(1, 2, 0) * 255).round().byte().numpy()
    path = os.path.join(tempfile.mkdtemp(prefix="bench_scan_"), "photo.jpg")
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)
    scanner = PhotoScanner(ScanSettings(model=model, device=str(device)), log=lambda *_: None)

    def run():
        scanner(path)
    return run, 1


def jpeg_entry(image: torch.Tensor):
    """Pillow decoding one JPEG (quality 90) of `image` to RGB pixels: the yardstick."""
    pixels = (image.permute(1, 2, 0) * 255).round().byte().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()

    def run():
        Image.open(io.BytesIO(data)).convert("RGB").load()
    return run, 1


# ------------------------------------------------------------------------------------------------ main
#: The shipped models whose scan.py verdict is timed: the plain scanner, and the smoothed one at its operating point.
SCAN_MODELS = ("pretrained_models/baseline", "pretrained_models/rs_aug")


def machine(device: torch.device) -> str:
    text = f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        text = f"{torch.cuda.get_device_name(device)} ({text})"
    return text


def settings(args, device) -> dict:
    """The sizes, batches and model choices for this device and --quick."""
    gpu = device.type == "cuda"
    if args.quick:
        return dict(train_sizes=(32, 48), train_batch={32: 2, 48: 2}, steps=1, scanner_size=48, scanner_batch=2,
                    stamp_sizes=((48, 48), (96, 128)), certify_n=8, certify_batch=4, repeats=1, arch="narrow",
                    encoder_width=0.25, working=(36, 48), smooth_n=40)
    return dict(
        train_sizes=(128, 400),
        train_batch={128: args.batch_size or (32 if gpu else 8), 400: args.batch_size or (16 if gpu else 2)},
        steps=args.steps or (5 if gpu else 1),
        scanner_size=400, scanner_batch=64 if gpu else 8,
        stamp_sizes=((400, 400), MEGAPIXEL_12),
        certify_n=args.certify_n or (4000 if gpu else 200), certify_batch=400 if gpu else 100,
        repeats=args.repeats, arch=args.scanner or ("resnet18" if gpu else "fast"), encoder_width=1.0,
        working=(341, 512), smooth_n=1000,  # scan.py's working size for a 481×321 photo, and its --n
    )


def entries(s: dict, device, photos):
    """(label, unit, make) for every measurement; make(after) builds the entry's function and its work per call
    (images, or noise samples) with the speed features on (after) or off (before)."""
    out = []
    for size in s["train_sizes"]:
        for script in SCRIPTS:
            b = s["train_batch"][size]
            out.append((f"training {script}.py, {size}² (batch {b}, {s['arch']} scanner)", "img/s",
                        lambda after, script=script, size=size, b=b: train_entry(
                            script, size, b, s["steps"], s["arch"], device, after, photos, s["encoder_width"])))
    size, b = s["scanner_size"], s["scanner_batch"]
    out.append((f"scanner inference, {size}² (batch {b}, {s['arch']})", "img/s",
                lambda after: scanner_entry(s["arch"], size, b, device, after, photos)))
    for hw in s["stamp_sizes"]:
        label = f"{hw[1]}×{hw[0]}" + (" (12 MP)" if hw == MEGAPIXEL_12 else "")
        out.append((f"stamping one {label} image (encoder + clamp)", "s/img",
                    lambda after, hw=hw: stamp_entry(hw, device, after, photos)))
    out.append((f"certification noise samples, {size}² (batch {s['certify_batch']}, {s['arch']})", "samples/s",
                lambda after: certify_entry(s["arch"], size, s["certify_n"], s["certify_batch"], device, after,
                                            photos)))
    for sequential in (False, True):
        how = f"sequential PREDICT, n ≤ {s['smooth_n']}" if sequential else f"fixed-n PREDICT, n {s['smooth_n']}"
        out.append((f"smoothed verdicts at {s['working'][1]}×{s['working'][0]} ({how}, {s['arch']})", "img/s",
                    lambda after, sequential=sequential: smoothed_entry(
                        s["arch"], s["working"], s["smooth_n"], s["certify_batch"], device, sequential, photos)))
    photo = (s["working"][0] * 321 // 341, s["working"][1] * 481 // 512)  # a bsds400 photo: 481×321
    for model in SCAN_MODELS:
        out.append((f"scan.py on one {photo[1]}×{photo[0]} JPEG file, {model} at its shipped calibration", "s/img",
                    lambda after, model=model: scan_entry(model, resized(photos[0], photo), device)))
    for hw in ((size, size), s["working"], s["stamp_sizes"][-1]):
        out.append((f"Pillow JPEG decode, {hw[1]}×{hw[0]} (yardstick, 1 core)", "img/s",
                    lambda after, hw=hw: jpeg_entry(resized(photos[0], hw))))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, ...")
    parser.add_argument("--compare", action="store_true",
                        help="also measure with the speed features off (before) and print the ratio after/before")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one run each: a smoke test")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs per entry; the median is reported")
    parser.add_argument("--budget", type=positive_float, default=15.0,
                        help="seconds: an entry whose warm-up run took longer is reported from that run alone")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="training steps per timed run (default: 5 on CUDA, 1 on CPU)")
    parser.add_argument("--batch_size", type=positive_int, default=None,
                        help="training batch at both sizes (default: 32 at 128², 16 at 400² on CUDA; 8 and 2 on CPU)")
    parser.add_argument("--scanner", choices=ARCHS, default=None,
                        help="scanner architecture (default: resnet18 on CUDA, fast on CPU)")
    parser.add_argument("--certify_n", type=positive_int, default=None,
                        help="noise samples per timed certification run (default: 4000 on CUDA, 200 on CPU)")
    parser.add_argument("--only", default=None, help="run only the entries whose label contains this text")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    s = settings(args, device)
    photos = load_photos()
    modes = (False, True) if args.compare else (True,)
    loads = [load_average()]
    print(f"bench on {device}: {machine(device)}; load average (1 min) {loads[0]:.2f}", flush=True)
    rows = []
    for label, unit, make in entries(s, device, photos):
        if args.only and args.only not in label:
            continue
        loads.append(load_average())
        results = {}
        for after, (seconds, runs, peak, work) in measure(make, modes, device, s["repeats"], args.budget).items():
            results[after] = (seconds / work if unit == "s/img" else work / seconds, runs, peak)
        rows.append((label, unit, results))
        print(format_row(label, unit, results, args.compare, s["repeats"]), flush=True)
    loads.append(load_average())
    print()
    print(format_table(rows, args.compare, device, s, loads))
    return rows


def _value(value: float, runs: int, repeats: int) -> str:
    """The value to 3 significant digits, marked ¹ when its warm-up exceeded the budget and was its only run."""
    text = f"{value:.3g}" if value < 100 else f"{value:,.0f}"
    return text + ("¹" if runs < repeats else "")


def format_row(label, unit, results, compare, repeats) -> str:
    after = results[True]
    if not compare:
        return f"{label}: {_value(after[0], after[1], repeats)} {unit}, peak {after[2]:,.0f} MB"
    before = results[False]
    return (f"{label}: before {_value(before[0], before[1], repeats)}, "
            f"after {_value(after[0], after[1], repeats)} {unit} "
            f"(×{ratio(unit, before[0], after[0]):.2f}), peak {before[2]:,.0f} → {after[2]:,.0f} MB")


def ratio(unit: str, before: float, after: float) -> float:
    """How many times faster "after" is (seconds per image: before / after; rates: after / before)."""
    return before / after if unit == "s/img" else after / before


def load_average() -> float:
    """The 1-minute load average (NaN where the system has none): the bench's own load is about its threads."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def format_table(rows, compare, device, s, loads) -> str:
    n = s["repeats"]
    lines = [f"Median of {n} timed run(s) after a warm-up (¹: the warm-up alone, over --budget); {machine(device)}; "
             f"load average (1 min) {loads[0]:.2f} at the start, {min(loads):.2f} to {max(loads):.2f} between "
             f"entries.", ""]
    if compare:
        lines += ["| measurement | unit | before | after | speed-up | peak memory before → after (MB) |",
                  "|---|---|---:|---:|---:|---:|"]
        for label, unit, r in rows:
            b, a = r[False], r[True]
            lines.append(f"| {label} | {unit} | {_value(b[0], b[1], n)} | {_value(a[0], a[1], n)} | "
                         f"×{ratio(unit, b[0], a[0]):.2f} | {b[2]:,.0f} → {a[2]:,.0f} |")
    else:
        lines += ["| measurement | unit | value | peak memory (MB) |", "|---|---|---:|---:|"]
        for label, unit, r in rows:
            a = r[True]
            lines.append(f"| {label} | {unit} | {_value(a[0], a[1], n)} | {a[2]:,.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
