"""The GPU check: one short script that exercises every CUDA path of the project and prints what it measured.

    bash scripts/gpu_check.sh            # on a GPU: about 8 minutes, plus the step profile (estimated 2-3)
    python scripts/gpu_check.py --tiny   # the same entries at tiny sizes on CPU (tests/test_gpu_check.py)

Entries, in order: each training script with --recipe original (the original encoder and detector, 400×400, batch
64) for --steps steps with AMP off and on; train.py under torchrun with one process; evaluate.py --quick on the
first run; the losses on the device against CPU; bench.py --quick; then the step profile: the training step of each
script with each recipe (its own networks, batch, AMP and padding; train_rs_aug.py with every corruption at full
strength), with channels_last on and off. Each entry prints one line: its wall time, training images/s (from the
run's summary.json, or timed over --profile_steps steps) and peak GPU memory; a profile line adds the host-device
synchronisations per step, as CUDA reports them (torch.cuda.set_sync_debug_mode) and as engine.hostsync counts them
(with the code lines that cause them, printed below). The profile ends with channels_last off against on per script
and recipe: the measurement that decides the CUDA default (engine.device.use_channels_last). A failing entry prints
its error and the check goes on, exiting 1 at the end. --only TEXT runs the entries whose label contains TEXT.

With --tiny the networks are replaced by tiny fully convolutional ones at 32 px (everything else is the same
code path; the synchronisations are engine.hostsync's CPU simulation) and bench.py is left out
(tests/test_bench.py runs it), so that the check itself is tested on CPU.
"""
from __future__ import annotations

import argparse
import importlib
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
    p.add_argument("--profile_steps", type=int, default=10, help="timed training steps per step-profile entry")
    p.add_argument("--only", default=None, help="run only the entries whose label contains this text")
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.batch_size = min(args.steps, 2), min(args.batch_size, 2)
        args.profile_steps = min(args.profile_steps, 2)
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    base = ["--recipe", "original", "--train_path", "bundled", "--results_dir", str(out), "--device", args.device,
            "--batch_size", str(args.batch_size), "--max_step", str(args.steps), "--val_every", str(10 ** 9),
            "--save_every", str(args.steps), "--val_images", "8", "--test_images", "8", "--lps_w", "0",
            *(TINY_NETS if args.tiny else [])]
    print(f"GPU check: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'}; torch "
          f"{torch.__version__}; {args.steps} steps at batch {args.batch_size}; runs in {out}", flush=True)
    failures, rows = [], []

    def entry(label, fn):
        if args.only and args.only not in label:
            return
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

    def losses_on_device():
        """The loss pieces made on the device (colour matrices, YUV weights, labels) give CPU's numbers: on CUDA the
        colour transforms take the 1×1-convolution path, which CPU runs never reach (TF32 convolutions: ~1e-3)."""
        from engine.device import pick_device
        from engine.losses import pair_labels, residual_regularisation, rgb_to_yuv, yuv_to_rgb
        device = pick_device(args.device)
        x = torch.rand(4, 3, 33, 47, generator=torch.Generator().manual_seed(0))
        on_device = x.to(device)
        worst = 0.0
        for fn in (rgb_to_yuv, yuv_to_rgb):
            here = fn(on_device)
            assert here.device.type == device.type and here.dtype == x.dtype, (fn.__name__, here.device, here.dtype)
            worst = max(worst, (here.cpu() - fn(x)).abs().max().item())
        loss = residual_regularisation(0.9 * on_device, on_device, 0.1 * on_device, 0.1)
        assert loss.device.type == device.type
        worst = max(worst, abs(loss.item() - residual_regularisation(0.9 * x, x, 0.1 * x, 0.1).item()))
        labels = pair_labels(4, device)
        assert labels.device.type == device.type and labels.tolist() == [0] * 4 + [1] * 4
        assert worst < 5e-3, f"max |device − CPU| {worst}"
        return f"max |Δ| vs CPU {worst:.1e}"

    entry("losses on the device vs CPU", losses_on_device)

    def bench_quick():
        import bench
        bench.main(["--quick", "--device", args.device])

    if not args.tiny:  # tests/test_bench.py runs bench.py --quick on CPU already
        entry("bench.py --quick", bench_quick)

    speeds, sites = {}, {}
    for script in ("train", "train_rs", "train_rs_aug"):
        for recipe in ("original", "robust"):
            for layout in ("on", "off"):
                def run_profile(script=script, recipe=recipe, layout=layout):
                    result = profile_step(script, recipe, layout == "on", args)
                    speeds[(script, recipe, layout)] = result["img_s"]
                    if result["sites"]:
                        sites[(script, recipe)] = result["sites"]
                    return result["detail"]
                entry(f"step profile {script}.py --recipe {recipe} channels_last {layout}", run_profile)
    if sites:
        print("\n== host-device synchronisations per step, where (engine.hostsync; channels_last does not change them)")
        for (script, recipe), text in sites.items():
            print(f"{script}.py --recipe {recipe}:\n  " + text.replace("\n", "\n  "))
    layouts = [f"{script}.py --recipe {recipe}: off {speeds[(script, recipe, 'off')]:.1f}, on "
               f"{speeds[(script, recipe, 'on')]:.1f} img/s (on/off ×"
               f"{speeds[(script, recipe, 'on')] / speeds[(script, recipe, 'off')]:.2f}): faster "
               f"{'on' if speeds[(script, recipe, 'on')] > speeds[(script, recipe, 'off')] else 'off'}"
               for script in ("train", "train_rs", "train_rs_aug") for recipe in ("original", "robust")
               if (script, recipe, "on") in speeds and (script, recipe, "off") in speeds]
    if layouts:
        print("\n== channels_last: off vs on (on CUDA this decides engine.device.use_channels_last)\n"
              + "\n".join(layouts))
    print("\n== GPU check summary\n" + "\n".join(rows))
    if failures:
        print(f"{len(failures)} of {len(rows)} entries failed: {', '.join(failures)}")
        return 1
    print(f"all {len(rows)} entries passed")
    return 0


def profile_step(script: str, recipe: str, channels_last: bool, args) -> dict:
    """The training step of `script` with `recipe`'s settings (LPIPS off: its weights are a download), as
    bench.py builds it (engine.training.Trainer, random crops of the bundled photos, no data loader): 2 warm-up
    steps, 2 counted steps (CUDA's synchronisations and engine.hostsync's count), then --profile_steps timed ones.
    → {"img_s", "detail" (the entry's line), "sites" (where the counted synchronisations come from)}."""
    import bench
    from engine.device import configure_speed, pick_device
    from engine.hostsync import HostSyncCounter, cuda_sync_warnings, optimizer_host_tensors
    from engine.training import Trainer

    device = pick_device(args.device)
    flags = ["--run_name", "profile", "--recipe", recipe, "--device", str(device), "--lps_w", "0",
             "--channels_last" if channels_last else "--no-channels_last"]
    if args.tiny:
        flags += [*TINY_NETS, "--batch_size", "2"]
    if script == "train_rs_aug":
        flags += ["--aug_start", "0", "--aug_end", "0", "--aug_prb", "1"]  # every corruption, at full strength
    _, targs, views = importlib.import_module(script).parse(flags)
    configure_speed(device)
    torch.manual_seed(0)
    trainer = Trainer(targs, views, device, log=lambda *a: None)
    batches = [b.to(device) for b in bench.training_batches(bench.load_photos(), targs.image_size, targs.batch_size,
                                                            count=2)]
    step = 0

    def steps(n):
        nonlocal step
        for _ in range(n):
            trainer.step(batches[step % 2], step)
            step += 1

    steps(2)
    counted = 2
    with cuda_sync_warnings(device) as reported, HostSyncCounter(device, optimizer_host_tensors(trainer.optimizer)) \
            as counter:
        steps(counted)
    seconds = bench.once(lambda: steps(args.profile_steps), device)
    img_s = args.profile_steps * targs.batch_size / seconds
    kinds = ", ".join(f"{n / counted:g} {kind}" for kind, n in sorted(counter.counts.items())) or "none"
    if device.type == "cuda":
        detail = (f"{len(reported) / counted:g} syncs/step (CUDA), {counter.total / counted:g} counted ({kinds}); "
                  f"{img_s:.1f} img/s")
    else:
        detail = f"{counter.total / counted:g} syncs/step (simulated: {kinds}); {img_s:.1f} img/s"
    return {"img_s": img_s, "detail": f"batch {targs.batch_size}, {targs.image_size}²: {detail}",
            "sites": "\n".join(f"{n / counted:g}× {kind} at {site}"
                               for (kind, site), n in counter.sites.most_common())}


if __name__ == "__main__":
    sys.exit(main())
