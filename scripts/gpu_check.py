"""The GPU check: two short calls that exercise every CUDA path of the project and write what they measured.

    make wheelhouse                          # here, once: the wheels the GPU image lacks, into .whl/ (7 MB)
    bash scripts/gpu_check.sh --part 1       # there: the training entries (at most --budget seconds, 270 s)
    bash scripts/gpu_check.sh --part 2       # there: judging, the data loader, bench.py and the step profile
    python scripts/gpu_check.py --tiny --part all --device cpu   # every entry at tiny sizes on CPU (the tests)

Each call starts with a preflight (CUDA present, the device, its driver, torch, /dev/shm, every package and module
the project imports, the DistributedDataParallel keywords the code passes): a failing preflight stops the call in
seconds with one line and exit status 2. Then each entry runs and prints one line, and its row is appended to
REPORT/gpu_check_part<N>.jsonl the moment it is known (REPORT: --report, else $OUT where the device tool sets it,
else the runs folder), so a call cut short still returns every finished row; the summary ends the call in
REPORT/gpu_check_part<N>.txt. An entry is not started once --budget seconds have passed since the call began: it
is recorded as skipped (rerun it with --only). Exit status: 0 when every entry that ran passed, 1 when one failed.

Part 1, training (--recipe original: the original encoder and detector at 400x400, batch 64):
  - each training script with AMP off and on, for --steps steps: images/s after --warmup steps (the run's
    summary.json) and peak GPU memory;
  - torchrun with 2 processes where the node has 2 GPUs or more, else 1 (NCCL cannot put two ranks on one GPU);
  - a checkpoint written on CPU resumed on the device: the run continues, Adam stays fused, its step tensors and
    moments live on the device;
  - an fp16 run (AMP forced to fp16 with loss scaling) saved and resumed: the loss scale comes back;
  - dtypes: the networks' convolutions in bf16 (fp16 below compute capability 8) under training's AMP, in fp32
    when judging (evaluation inside a caller's autocast);
  - memory: allocated and peak at step 50 and step 200 of one training (fails when it grows by more than
    64 MiB between them).
Part 2, judging, data and speed:
  - the losses on the device against CPU;
  - train_rs.py (a short run) → evaluate.py --quick with smoothing → stamp.py on one photo → scan.py --certify;
  - the training data loader alone (workers, pinned memory, uint8 batches converted on the device) over 2,000
    JPEGs written for the check, the page cache dropped first where the machine lets us;
  - bench.py --quick;
  - the step profile: each script with each recipe, channels_last on and off: host-device synchronisations per
    step (as CUDA reports them and as engine.hostsync counts them) and images/s; it ends with the off-vs-on
    comparison that decides engine.device.use_channels_last.

With --tiny the networks are tiny fully convolutional ones at 32 px, and steps, batches and photo counts are
small; everything else is the same code path, so that the check itself is tested on CPU (tests/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import redirect_stdout
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

#: Every third-party package the project imports (the GPU image lacks kornia, lpips and pyautoattack: make wheelhouse).
PACKAGES = ("numpy", "scipy", "skimage", "PIL", "torchvision", "kornia", "lpips", "pyautoattack", "torchmetrics",
            "torch.utils.tensorboard", "tqdm", "safetensors", "matplotlib")
#: The project's entry points and packages: importing them imports everything they use.
MODULES = ("engine.training", "engine.evaluation", "product.stage", "smoothing.certify", "augment.forwarding",
           "report.product_card", "models.convert_original", "train", "train_rs", "train_rs_aug", "evaluate",
           "stamp", "scan", "bench")
TINY_NETS = ["--encoder", "unet", "--encoder_width", "0.25", "--scanner", "narrow", "--image_size", "32"]
MIB = 2 ** 20


class PreflightError(RuntimeError):
    """What stops a call before its first entry: one line."""


def ddp_keywords_used(source: Path = REPO / "engine" / "training.py") -> set[str]:
    """The keywords engine/training.py passes to DistributedDataParallel(...)."""
    used = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == \
                "DistributedDataParallel":
            used |= {k.arg for k in node.keywords if k.arg}
    return used


def preflight(device_name: str, tiny: bool) -> dict:
    """The machine, as the check needs it; PreflightError (one line) when something would make every entry fail."""
    import torch
    facts = {"torch": torch.__version__, "python": sys.version.split()[0], "cuda": torch.cuda.is_available()}
    if device_name != "cpu" and not torch.cuda.is_available():
        raise PreflightError(f"no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}): run the "
                             f"check on the GPU machine, or pass --device cpu")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(device=props.name, capability=f"{props.major}.{props.minor}", gpus=torch.cuda.device_count(),
                     gpu_memory_gib=round(props.total_memory / 2 ** 30, 1), cuda_runtime=torch.version.cuda)
        try:
            facts["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                             capture_output=True, text=True, timeout=30).stdout.split()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            facts["driver"] = "unknown (no nvidia-smi)"
    if os.path.isdir("/dev/shm"):
        shm = shutil.disk_usage("/dev/shm")
        facts["dev_shm_gib"] = round(shm.total / 2 ** 30, 2)
        facts["dev_shm_free_gib"] = round(shm.free / 2 ** 30, 2)
    for name in PACKAGES + MODULES:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any import failure stops the call with its one line
            hint = " (run `make wheelhouse` here and carry .whl: see docs/speed.md)" if name in PACKAGES else ""
            raise PreflightError(f"cannot import {name}: {type(e).__name__}: {e}{hint}") from None
    from torch.nn.parallel import DistributedDataParallel
    accepted = set(inspect.signature(DistributedDataParallel.__init__).parameters)
    missing = sorted(ddp_keywords_used() - accepted)
    recorded = [line.strip() for line in (REPO / "tests" / "data" / "torch_2_11_ddp_parameters.txt").read_text()
                .splitlines() if line.strip() and not line.startswith("#")]
    if torch.__version__.startswith("2.11."):  # the list tests/test_distributed.py checks the code against
        facts["ddp_parameters_recorded_for_2_11"] = ("match" if list(accepted)[1:] == recorded else
                                                     f"differ: installed {list(accepted)[1:]}")
    if missing:
        raise PreflightError(f"engine/training.py passes DistributedDataParallel({', '.join(missing)}=...), which "
                             f"torch {torch.__version__} does not take")
    facts["imports"] = f"{len(PACKAGES)} packages, {len(MODULES)} modules"
    return facts


class Report:
    """Runs entries within a time budget; each row goes to the JSON lines file as soon as it is known."""

    def __init__(self, folder: Path, part: str, budget_s: float, only: str | None):
        folder.mkdir(parents=True, exist_ok=True)
        self.jsonl, self.summary_path = folder / f"gpu_check_part{part}.jsonl", folder / f"gpu_check_part{part}.txt"
        self.jsonl.write_text("")
        self.part, self.budget_s, self.only, self.start = part, budget_s, only, time.time()
        self.rows, self.lines = [], []

    def write(self, row: dict) -> None:
        row = {"part": self.part, "at_s": round(time.time() - self.start, 1), **row}
        self.rows.append(row)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")

    def entry(self, label: str, fn) -> None:
        import torch
        if self.only and self.only not in label:
            return
        if time.time() - self.start > self.budget_s:
            self.write({"entry": label, "status": "skipped", "detail": f"not started: the {self.budget_s:.0f} s "
                        f"budget was spent; rerun with --only '{label}'"})
            self.lines.append(f"{label:<60} SKIP  (time budget spent)")
            print(self.lines[-1], flush=True)
            return
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        try:
            detail = fn() or ""
            status, error = "ok", None
        except Exception as e:  # noqa: BLE001 - a check reports every failure and goes on
            traceback.print_exc()
            status, detail, error = "FAIL", "", f"{type(e).__name__}: {e}"
        peak = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None
        seconds = round(time.time() - t0, 1)
        self.write({"entry": label, "status": status, "seconds": seconds, "detail": detail, "peak_gib": peak,
                    **({"error": error} if error else {})})
        shown = error if error else detail
        self.lines.append(f"{label:<60} {status:<4}  {seconds:7.1f} s  {shown}  peak "
                          f"{f'{peak:.2f} GiB' if cuda else 'n/a (no CUDA)'}")
        print(self.lines[-1], flush=True)

    def finish(self, extra: str = "") -> int:
        ran = [r for r in self.rows if r.get("status") in ("ok", "FAIL") and r["entry"] != "preflight"]
        failed = [r["entry"] for r in ran if r["status"] == "FAIL"]
        skipped = [r["entry"] for r in self.rows if r.get("status") == "skipped"]
        verdict = (f"{len(failed)} of {len(ran)} entries failed: {', '.join(failed)}" if failed
                   else f"all {len(ran)} entries passed")
        if skipped:
            verdict += f"; {len(skipped)} skipped for time: {', '.join(skipped)}"
        text = f"{extra}\n== GPU check part {self.part} summary ({time.time() - self.start:.0f} s)\n" + \
               "\n".join(self.lines) + f"\n{verdict}\n"
        self.summary_path.write_text(text)
        self.write({"entry": "summary", "status": "FAIL" if failed else "ok", "detail": verdict})
        print(text, flush=True)
        return 1 if failed else 0


class Check:
    """The entries, with what they share: flags, the runs folder, the device."""

    def __init__(self, args, out: Path):
        import torch
        from engine.device import pick_device
        self.args, self.out, self.tiny = args, out, args.tiny
        self.device = pick_device(args.device)
        self.base = ["--recipe", "original", "--train_path", "bundled", "--results_dir", str(out),
                     "--device", args.device, "--batch_size", str(args.batch_size), "--max_step", str(args.steps),
                     "--val_every", str(10 ** 9), "--save_every", str(args.steps), "--val_images", "8",
                     "--test_images", "8", "--lps_w", "0", *(TINY_NETS if args.tiny else [])]
        self.torch = torch

    # ------------------------------------------------------------------ helpers
    def speed(self, run: str) -> str:
        summary = json.loads((self.out / run / "eval" / "summary.json").read_text())
        after = summary.get("train_images_per_second_after_warmup")
        return (f"{after} img/s after {summary.get('speed_warmup_steps')} warm-up steps" if after is not None
                else f"{summary['train_images_per_second']} img/s (whole run)")

    def train(self, script: str, run: str, *extra) -> str:
        importlib.import_module(script).main(["--run_name", run, *self.base, "--speed_warmup",
                                              str(self.args.warmup), *extra])
        return self.speed(run)

    def trainer(self, script: str = "train", *flags, checkpoint=None):
        """engine.training.Trainer for `script` with the original recipe on this device (as bench.py builds it)."""
        from engine.training import Trainer
        argv = ["--run_name", "check", "--recipe", "original", "--device", str(self.device), "--lps_w", "0",
                "--batch_size", str(self.args.batch_size), *(TINY_NETS if self.tiny else []), *flags]
        _, targs, views = importlib.import_module(script).parse(argv)
        self.torch.manual_seed(0)
        return Trainer(targs, views, self.device, log=lambda *a: None, checkpoint=checkpoint), targs

    def batches(self, targs, count: int = 2):
        import bench
        return [b.to(self.device) for b in bench.training_batches(bench.load_photos(), targs.image_size,
                                                                  targs.batch_size, count=count)]

    def state_on_device(self, trainer) -> str:
        """Adam's state after a resume: every tensor on the training device, fused on CUDA."""
        opt = trainer.optimizer
        places = {t.device.type for s in opt.state.values() for t in s.values() if self.torch.is_tensor(t)}
        assert places == {self.device.type}, f"optimiser state on {places}, not {self.device.type}"
        fused = opt.param_groups[0].get("fused")
        if self.device.type == "cuda":
            assert fused, "Adam is not fused after the resume"
        return f"Adam state on {self.device.type}, fused {bool(fused)}"

    # ------------------------------------------------------------------ part 1
    def part1(self, report: Report) -> None:
        amps = ("off",) if self.tiny else ("off", "on")
        for script, extra in (("train", []), ("train_rs", ["--std", "0.5"]),
                              ("train_rs_aug", ["--std", "0.5", "--aug_start", "0",
                                                "--aug_end", str(self.args.steps)])):
            for amp in amps:
                report.entry(f"{script}.py --recipe original --amp {amp}",
                             lambda s=script, a=amp, e=extra: self.train(s, f"{s}_amp_{a}", "--amp", a, *e))
        procs = 2 if self.torch.cuda.device_count() >= 2 else 1
        report.entry(f"torchrun --nproc_per_node {procs} train.py", lambda: self.torchrun(procs))
        report.entry("resume a CPU-written checkpoint on the device", self.resume_cpu_checkpoint)
        report.entry("fp16 with loss scaling: save and resume", self.resume_fp16)
        report.entry("dtypes: AMP when training, fp32 when judging", self.dtypes)
        report.entry("memory at step 50 and step 200", self.memory_growth)

    def torchrun(self, procs: int) -> str:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               str(REPO / "train.py"), "--run_name", "torchrun", *self.base, "--speed_warmup", str(self.args.warmup)]
        subprocess.run(cmd, check=True, env=env, cwd=REPO, timeout=600)
        return self.speed("torchrun")

    def resume_cpu_checkpoint(self) -> str:
        import train
        from engine.checkpoint import load_checkpoint
        run = "resume_cpu"
        flags = ["--run_name", run, *self.base, "--batch_size", "2", "--save_every", "2"]
        train.main([*flags, "--device", "cpu", "--max_step", "2"])
        written = self.out / run / "checkpoints" / "last.pt"
        cpu_copy = shutil.copy(written, self.out / run / "written_on_cpu.pt")
        train.main([*flags, "--max_step", "4"])  # the same command on the device: resumes at step 2
        step = load_checkpoint(written)["step"]
        assert step == 4, f"the resumed run ended at step {step}, not 4"
        trainer, targs = self.trainer("train", "--batch_size", "2", checkpoint=load_checkpoint(cpu_copy))
        detail = self.state_on_device(trainer)
        loss = trainer.step(self.batches(targs, 1)[0], 2)["loss/total"]
        assert self.torch.isfinite(self.torch.as_tensor(loss)).item(), "the first step after the resume is not finite"
        return f"resumed at step 2, ended at 4; {detail}"

    def resume_fp16(self) -> str:
        import engine.device
        import engine.training
        from engine.checkpoint import load_checkpoint, save_checkpoint
        torch = self.torch
        fp16 = (lambda device: torch.float16 if torch.device(device).type == "cuda" else None)
        with mock.patch.object(engine.device, "amp_dtype", fp16), mock.patch.object(engine.training, "amp_dtype",
                                                                                      fp16):
            trainer, targs = self.trainer("train", "--amp", "on")
            batches = self.batches(targs)
            for step in range(3):
                trainer.step(batches[step % 2], step)
            path = save_checkpoint(trainer.state(3), self.out / "fp16.pt")
            resumed, _ = self.trainer("train", "--amp", "on", checkpoint=load_checkpoint(path))
            scale, back = trainer.scaler.get_scale(), resumed.scaler.get_scale()
            assert back == scale, f"loss scale {back} after the resume, {scale} before"
            if self.device.type == "cuda":
                assert resumed.scaler.is_enabled(), "fp16 without loss scaling"
            detail = self.state_on_device(resumed)
            loss = resumed.step(batches[1], 3)["loss/total"]
            assert torch.isfinite(torch.as_tensor(loss)).item(), "the first fp16 step after the resume is not finite"
        return f"loss scale {scale:g} kept ({'on' if resumed.scaler.is_enabled() else 'off: CPU'}); {detail}"

    def dtypes(self) -> str:
        from engine.device import amp_dtype, autocast
        from engine.evaluation import evaluate
        torch = self.torch
        trainer, targs = self.trainer("train", "--amp", "on")
        seen = set()
        hooks = [m.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
                 for net in (trainer.encoder, trainer.scanner) for m in net.modules()
                 if isinstance(m, torch.nn.Conv2d)]
        batch = self.batches(targs, 1)[0]
        trainer.step(batch, 0)
        training = set(seen)
        expected = {amp_dtype(self.device) or torch.float32}
        seen.clear()
        with autocast(self.device):
            evaluate(trainer.encoder, trainer.scanner, [batch], self.device)
        judging = set(seen)
        for h in hooks:
            h.remove()
        assert training == expected, f"convolutions in {training} when training, not {expected}"
        assert judging == {torch.float32}, f"convolutions in {judging} when judging, not float32"
        name = lambda dtypes: "/".join(sorted(str(d).replace("torch.", "") for d in dtypes))  # noqa: E731
        return f"training {name(training)}, judging {name(judging)}"

    def memory_growth(self) -> str:
        torch = self.torch
        first, last = (4, 8) if self.tiny else (50, 200)
        trainer, targs = self.trainer("train", "--amp", "on")
        batches = self.batches(targs)
        marks = {}
        for step in range(last):
            trainer.step(batches[step % 2], step)
            if step + 1 in (first, last) and torch.cuda.is_available():
                torch.cuda.synchronize()
                marks[step + 1] = (torch.cuda.memory_allocated() / MIB, torch.cuda.max_memory_allocated() / MIB)
        if not marks:
            return f"{last} steps on {self.device.type}: no CUDA memory to read"
        grown = marks[last][0] - marks[first][0]
        assert grown <= 64, f"allocated memory grew by {grown:.0f} MiB from step {first} to step {last}"
        return "; ".join(f"step {s}: {a:.0f} MiB allocated, {p:.0f} MiB peak" for s, (a, p) in marks.items())

    # ------------------------------------------------------------------ part 2
    def part2(self, report: Report) -> None:
        report.entry("losses on the device vs CPU", self.losses_on_device)
        report.entry("train_rs.py → evaluate.py --quick → stamp.py → scan.py --certify", self.smoothed_chain)
        report.entry(f"the training loader alone on {self.args.loader_images} JPEGs", self.loader)
        if not self.tiny:  # tests/test_bench.py runs bench.py --quick on CPU already
            report.entry("bench.py --quick", self.bench_quick)
        self.step_profile(report)

    def losses_on_device(self) -> str:
        """The loss pieces made on the device (colour matrices, YUV weights, labels) give CPU's numbers: on CUDA the
        colour transforms take the 1×1-convolution path, which CPU runs never reach (TF32 convolutions: ~1e-3)."""
        from engine.losses import pair_labels, residual_regularisation, rgb_to_yuv, yuv_to_rgb
        torch = self.torch
        x = torch.rand(4, 3, 33, 47, generator=torch.Generator().manual_seed(0))
        on_device = x.to(self.device)
        worst = 0.0
        for fn in (rgb_to_yuv, yuv_to_rgb):
            here = fn(on_device)
            assert here.device.type == self.device.type and here.dtype == x.dtype, (fn.__name__, here.device)
            worst = max(worst, (here.cpu() - fn(x)).abs().max().item())
        loss = residual_regularisation(0.9 * on_device, on_device, 0.1 * on_device, 0.1)
        assert loss.device.type == self.device.type
        worst = max(worst, abs(loss.item() - residual_regularisation(0.9 * x, x, 0.1 * x, 0.1).item()))
        labels = pair_labels(4, self.device)
        assert labels.device.type == self.device.type and labels.tolist() == [0] * 4 + [1] * 4
        assert worst < 5e-3, f"max |device − CPU| {worst}"
        return f"max |Δ| vs CPU {worst:.1e}"

    def smoothed_chain(self) -> str:
        import evaluate
        import scan
        import stamp
        import train_rs
        from PIL import Image
        from skimage import data
        run = self.out / "rs_chain"
        train_rs.main(["--run_name", "rs_chain", *self.base, "--std", "0.5",
                       "--max_step", str(min(self.args.steps, 50)), "--save_every", str(min(self.args.steps, 50))])
        results = evaluate.main(["--checkpoint", str(run), "--quick", "--device", self.args.device, "--overwrite",
                                 *(["--size", "32"] if self.tiny else [])])
        judge = results["settings"]["judge"]
        assert judge.startswith("smoothed"), f"evaluate.py --quick judged the σ 0.5 run {judge!r}, not smoothed"
        photos = self.out / "chain_photo"
        photos.mkdir(exist_ok=True)
        Image.fromarray(data.astronaut()).save(photos / "astronaut.png")
        assert stamp.main(["--model", str(run), "--out", str(self.out / "chain_stamped"), "--overwrite",
                           "--device", self.args.device, str(photos / "astronaut.png")]) == 0
        n = "100" if self.tiny else "1000"
        buffer = io.StringIO()
        with redirect_stdout(buffer):
            code = scan.main(["--model", str(run), "--certify", "--n", n, "--json", "--device", self.args.device,
                              str(self.out / "chain_stamped" / "astronaut.png")])
        assert code == 0, f"scan.py --certify exited {code}"
        verdict = json.loads(buffer.getvalue().strip().splitlines()[-1])
        assert verdict["certify_n"] == int(n) and "radius" in verdict, verdict
        return (f"evaluate --quick smoothed; scan --certify n {n}: {verdict['verdict']}, certified "
                f"{verdict['certified']} r {verdict['radius']:.3f} in {verdict.get('seconds', float('nan')):.1f} s")

    def loader(self) -> str:
        """engine.training's training loader (its dataset, workers, pinned memory, uint8 batches) over JPEGs written
        for the check, each batch moved to the device and converted there, as a training step receives it."""
        from torch.utils.data import SequentialSampler
        from datasets import ImageFolderDataset, to_unit_float
        from engine.training import training_loader
        torch = self.torch
        folder = write_jpegs(self.out / "loader_jpegs", self.args.loader_images)
        cached = drop_page_cache()
        size = 32 if self.tiny else 400
        # the original recipe's training set: each photo fitted (centre square, resized), uint8, nothing kept
        dataset = ImageFolderDataset(sorted(folder.glob("*.jpg")), size, mode="center", cache=False,
                                     dtype=torch.uint8)
        loader = training_loader(dataset, self.args.batch_size, SequentialSampler(dataset), self.device)
        t0, seen, first = time.time(), 0, None
        for batch in loader:
            x = to_unit_float(batch, self.device)
            seen += x.shape[0]
            if first is None:
                first = time.time() - t0
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.time() - t0
        assert seen >= self.args.loader_images - self.args.batch_size, f"{seen} images from the loader"
        return (f"{seen / seconds:.0f} img/s at {size}² ({loader.num_workers} workers, first batch after "
                f"{first:.1f} s; {'page cache dropped' if cached else 'page cache not dropped: not permitted'})")

    def bench_quick(self) -> str:
        import bench
        bench.main(["--quick", "--device", self.args.device])

    def step_profile(self, report: Report) -> None:
        speeds, sites = {}, {}
        for script in ("train", "train_rs", "train_rs_aug"):
            for recipe in ("original", "robust"):
                for layout in ("on", "off"):
                    def run_profile(script=script, recipe=recipe, layout=layout):
                        result = profile_step(script, recipe, layout == "on", self.args)
                        speeds[(script, recipe, layout)] = result["img_s"]
                        if result["sites"]:
                            sites[(script, recipe)] = result["sites"]
                        return result["detail"]
                    report.entry(f"step profile {script}.py --recipe {recipe} channels_last {layout}", run_profile)
        lines = []
        if sites:
            lines.append("== host-device synchronisations per step, where (engine.hostsync; channels_last does not "
                         "change them)")
            lines += [f"{script}.py --recipe {recipe}:\n  " + text.replace("\n", "\n  ")
                      for (script, recipe), text in sites.items()]
        layouts = [f"{script}.py --recipe {recipe}: off {speeds[(script, recipe, 'off')]:.1f}, on "
                   f"{speeds[(script, recipe, 'on')]:.1f} img/s (on/off ×"
                   f"{speeds[(script, recipe, 'on')] / speeds[(script, recipe, 'off')]:.2f}): faster "
                   f"{'on' if speeds[(script, recipe, 'on')] > speeds[(script, recipe, 'off')] else 'off'}"
                   for script in ("train", "train_rs", "train_rs_aug") for recipe in ("original", "robust")
                   if (script, recipe, "on") in speeds and (script, recipe, "off") in speeds]
        if layouts:
            lines += ["== channels_last: off vs on (on CUDA this decides engine.device.use_channels_last)", *layouts]
        self.profile_text = "\n".join(lines)


def write_jpegs(folder: Path, count: int) -> Path:
    """`count` JPEGs (q 90, 500×375 crops at random scales of the photos scikit-image ships), written in parallel."""
    from concurrent.futures import ProcessPoolExecutor
    folder.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(_write_jpeg, [(folder, i) for i in range(count)], chunksize=16))
    return folder


def _write_jpeg(job) -> None:
    import numpy as np
    from PIL import Image
    from skimage import data
    folder, i = job
    names = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry")
    rng = np.random.default_rng(i)
    photo = Image.fromarray(getattr(data, names[i % len(names)])())
    scale = rng.uniform(0.6, 1.0)
    w, h = int(photo.width * scale), int(photo.height * scale)
    left, top = rng.integers(0, photo.width - w + 1), rng.integers(0, photo.height - h + 1)
    photo.crop((left, top, left + w, top + h)).resize((500, 375), Image.Resampling.BICUBIC).save(
        folder / f"{i:05d}.jpg", quality=90)


def drop_page_cache() -> bool:
    """Ask the kernel to drop its page cache (root on Linux), so the loader reads the JPEGs from disk."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def profile_step(script: str, recipe: str, channels_last: bool, args) -> dict:
    """The training step of `script` with `recipe`'s settings (LPIPS off: its weights are a download), as
    bench.py builds it (engine.training.Trainer, random crops of the bundled photos, no data loader): 2 warm-up
    steps, 2 counted steps (CUDA's synchronisations and engine.hostsync's count), then --profile_steps timed ones.
    → {"img_s", "detail" (the entry's line), "sites" (where the counted synchronisations come from)}."""
    import torch
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("1", "2", "all"), default="all",
                   help="1: the training entries; 2: judging, the loader, bench.py and the step profile; all: both "
                        "(longer than one device call allows: for CPU and for a machine of your own)")
    p.add_argument("--budget", type=float, default=270.0,
                   help="seconds after which no further entry starts (its row says skipped); the default leaves a "
                        "5-minute call room to finish the entry in progress")
    p.add_argument("--steps", type=int, default=100, help="training steps per training-script entry")
    p.add_argument("--warmup", type=int, default=20,
                   help="steps left out of a training entry's images/s (cuDNN autotuning, the loader's first batches)")
    p.add_argument("--batch_size", type=int, default=64, help="training batch (the original recipe's: 64)")
    p.add_argument("--loader_images", type=int, default=2000, help="JPEGs the loader entry writes and reads")
    p.add_argument("--device", default="auto", help="auto, cuda, cpu")
    p.add_argument("--tiny", action="store_true",
                   help="tiny networks at 32 px, 2 steps, batch 2, 64 loader images: the check itself on CPU")
    p.add_argument("--out", type=Path, default=None, help="folder for the runs (default: a temporary folder)")
    p.add_argument("--report", type=Path, default=None,
                   help="folder for gpu_check_part<N>.jsonl and .txt (default: $OUT when set, else --out's folder)")
    p.add_argument("--profile_steps", type=int, default=10, help="timed training steps per step-profile entry")
    p.add_argument("--only", default=None, help="run only the entries whose label contains this text")
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.batch_size, args.warmup = min(args.steps, 2), min(args.batch_size, 2), min(args.warmup, 1)
        args.profile_steps, args.loader_images = min(args.profile_steps, 2), min(args.loader_images, 64)
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    report_dir = args.report or (Path(os.environ["OUT"]) if os.environ.get("OUT") else out)
    report = Report(report_dir, args.part, args.budget, args.only)
    try:
        facts = preflight(args.device, args.tiny)
    except PreflightError as e:
        report.write({"entry": "preflight", "status": "FAIL", "error": str(e)})
        print(f"GPU check preflight failed: {e}", flush=True)
        return 2
    report.write({"entry": "preflight", "status": "ok", **facts})
    print("GPU check preflight: " + ", ".join(f"{k} {v}" for k, v in facts.items()), flush=True)
    print(f"part {args.part}: {args.steps} steps at batch {args.batch_size}; runs in {out}; rows in {report.jsonl}",
          flush=True)
    check = Check(args, out)
    check.profile_text = ""
    if args.part in ("1", "all"):
        check.part1(report)
    if args.part in ("2", "all"):
        check.part2(report)
    return report.finish(check.profile_text)


if __name__ == "__main__":
    sys.exit(main())
