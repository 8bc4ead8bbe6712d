"""The GPU check: one short script that exercises every CUDA path of the project and prints what it measured.

    bash scripts/gpu_check.sh            # on a GPU: at most about 8 minutes
    python scripts/gpu_check.py --tiny   # the same entries at tiny sizes on CPU (tests/test_gpu_check.py)

Entries, in order: each training script with --recipe original (the original encoder and detector, 400×400,
batch 64) for --steps steps with AMP off and on; train.py under torchrun with one process; evaluate.py --quick on
the first run; bench.py --quick. Each entry prints one line: its wall time, training images/s (from the run's
summary.json) and peak GPU memory; a failing entry prints its error and the check goes on, exiting 1 at the end.
With --tiny the networks are replaced by tiny fully convolutional ones at 32 px (everything else is the same
code path) and bench.py is left out (tests/test_bench.py runs it), so that the check itself is tested on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

TINY_NETS = ["--encoder", "unet", "--encoder_width", "0.25", "--scanner", "narrow", "--image_size", "32"]


def _peak_gb() -> str:
    if not torch.cuda.is_available():
        return "n/a (no CUDA)"
    return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="training steps per entry")
    p.add_argument("--batch_size", type=int, default=64, help="training batch (the original recipe's: 64)")
    p.add_argument("--device", default="auto", help="auto, cuda, cpu")
    p.add_argument("--tiny", action="store_true", help="tiny networks at 32 px, 2 steps, batch 2: for CPU tests")
    p.add_argument("--out", type=Path, default=None, help="folder for the runs (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.batch_size = min(args.steps, 2), min(args.batch_size, 2)
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    base = ["--recipe", "original", "--train_path", "bundled", "--results_dir", str(out), "--device", args.device,
            "--batch_size", str(args.batch_size), "--max_step", str(args.steps), "--val_every", str(10 ** 9),
            "--save_every", str(args.steps), "--val_images", "8", "--test_images", "8", "--lps_w", "0",
            *(TINY_NETS if args.tiny else [])]
    print(f"GPU check: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'}; torch "
          f"{torch.__version__}; {args.steps} steps at batch {args.batch_size}; runs in {out}", flush=True)
    failures, rows = [], []

    def entry(label, fn):
        _reset_peak()
        t0 = time.time()
        try:
            detail = fn() or ""
            rows.append(f"{label:<44} ok    {time.time() - t0:7.1f} s  {detail:<22} peak {_peak_gb()}")
        except BaseException as e:  # noqa: BLE001 - a check reports every failure and goes on
            if isinstance(e, KeyboardInterrupt):
                raise
            failures.append(label)
            rows.append(f"{label:<44} FAIL  {time.time() - t0:7.1f} s  {type(e).__name__}: {e}")
            traceback.print_exc()
        print(rows[-1], flush=True)

    def speed(run):
        summary = json.loads((out / run / "eval" / "summary.json").read_text())
        return f"{summary['train_images_per_second']} img/s"

    def train(script, run, *extra):
        module = __import__(script)
        module.main(["--run_name", run, *base, *extra])
        return speed(run)

    amps = ("off",) if args.tiny else ("off", "on")
    for script, extra in (("train", []), ("train_rs", ["--std", "0.5"]),
                          ("train_rs_aug", ["--std", "0.5", "--aug_start", "0", "--aug_end", str(args.steps)])):
        for amp in amps:
            run = f"{script}_amp_{amp}"
            entry(f"{script}.py --recipe original --amp {amp}", lambda s=script, r=run, a=amp, e=extra: train(
                s, r, "--amp", a, *e))

    def torchrun():
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               str(REPO / "train.py"), "--run_name", "torchrun", *base]
        subprocess.run(cmd, check=True, env=env, cwd=REPO, timeout=900)
        return speed("torchrun")

    entry("torchrun --nproc_per_node 1 train.py", torchrun)

    def evaluate_quick():
        import evaluate
        evaluate.main(["--checkpoint", str(out / "train_amp_off"), "--quick", "--device", args.device,
                       *(["--size", "32"] if args.tiny else [])])

    entry("evaluate.py --quick", evaluate_quick)

    def bench_quick():
        import bench
        bench.main(["--quick", "--device", args.device])

    if not args.tiny:  # tests/test_bench.py runs bench.py --quick on CPU already
        entry("bench.py --quick", bench_quick)
    print("\n== GPU check summary\n" + "\n".join(rows))
    if failures:
        print(f"{len(failures)} of {len(rows)} entries failed: {', '.join(failures)}")
        return 1
    print(f"all {len(rows)} entries passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
