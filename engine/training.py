"""The one training loop behind train.py, train_rs.py and train_rs_aug.py.

The scripts differ only in the *views* of the pair [x, x'] that the scanner learns to classify: a view
function maps (pair (2B,3,H,W), step) to a list of `View`s. Everything else lives here: device and AMP,
seeding, data, losses, warm-up, checkpoints and resumption, TensorBoard, progress, validation, summary.
"""
from __future__ import annotations

import json
import math
import sys
import time
from collections import defaultdict
from dataclasses import asdict
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid
from tqdm import tqdm

from datasets import ImageFolderDataset, resolve_image_paths, split_files
from models import Scanner, ScannerConfig, StampEncoder, StampEncoderConfig, save_pretrained
from models.io import config_from_dict

from .checkpoint import load_checkpoint, save_checkpoint
from .cli import RESUMABLE_FLAGS
from .device import amp_dtype, autocast, pick_device, rng_state, seed_everything, set_rng_state
from .evaluation import evaluate, preview_rows, save_preview
from .losses import View, load_lpips, pair_labels, perceptual_loss, residual_regularisation
from .rundir import RunDir

ViewFn = Callable[[torch.Tensor, int], list[View]]


def plain_view(pair: torch.Tensor, step: int) -> list[View]:
    """The baseline: the scanner sees [x, x'] as they are."""
    return [View("plain", pair)]


def combine_views(*view_fns: ViewFn) -> ViewFn:
    """One view function that returns the views of all of `view_fns`, in order."""
    def views(pair: torch.Tensor, step: int) -> list[View]:
        return [v for fn in view_fns for v in fn(pair, step)]
    return views


def linear_ramp(step: int, start: int, end: int) -> float:
    """0 before `start`, 1 from `end` on, linear in between (a step at `end` when start == end)."""
    if step >= end:
        return 1.0
    if step < start:
        return 0.0
    return (step - start) / (end - start)


def image_loss_ramp(step: int, warmup_steps: int, ramp_steps: int) -> float:
    """Weight factor of the image losses: 0 for warmup_steps, then linear to 1 over ramp_steps."""
    return linear_ramp(step, warmup_steps, warmup_steps + ramp_steps)


def _forever(loader):
    while True:
        yield from loader


class _Run:
    """The state of one training run; `train` drives it."""

    def __init__(self, args, views: ViewFn, log=print):
        self.args, self.views, self.log = args, views, log
        self.device = pick_device(args.device)
        self.run = RunDir.create(args.results_dir, args.run_name)
        checkpoint = load_checkpoint(self.run.last_checkpoint) if self.run.last_checkpoint.exists() else None
        self.start_step = checkpoint["step"] if checkpoint else 0
        seed_everything(args.seed)

        self._build_data()
        self._build_models(checkpoint)
        self.lpips = load_lpips(self.device, log) if args.lps_w > 0 else None
        self.bn_freeze_step = (args.warmup_steps + args.ramp_steps if args.bn_freeze_step is None
                               else args.bn_freeze_step)
        if checkpoint:
            self._resume(checkpoint)
        self.run.write_args({**vars(args), "resumed_from_step": self.start_step, "device_used": str(self.device)})
        # purge_step drops events a crashed run logged after its last checkpoint, so curves do not fold back.
        self.writer = SummaryWriter(self.run.tb, purge_step=self.start_step or None)
        if self.start_step == 0:
            self.writer.add_text("args", "\n".join(f"    {k} = {v}" for k, v in sorted(vars(args).items())))

    # ---------------------------------------------------------------- set-up
    def _build_data(self):
        args = self.args
        self.eval_size = args.eval_size or args.image_size
        paths = resolve_image_paths(args.train_path, log=self.log)
        self.split = split_files(paths, seed=args.split_seed)
        self.log(f"data: {len(self.split.train)} train, {len(self.split.val)} val, {len(self.split.test)} test images")
        train_set = ImageFolderDataset(self.split.train, args.image_size, mode="random",
                                       max_crop_scale=args.max_crop_scale)
        # At least 50 batches per pass, so tiny folders do not restart the loader every few steps.
        sampler = RandomSampler(train_set, num_samples=max(len(train_set), 50 * args.batch_size))
        workers = args.workers if args.workers is not None else (4 if self.device.type == "cuda" else 0)
        self.train_loader = DataLoader(train_set, args.batch_size, sampler=sampler, drop_last=True,
                                       num_workers=workers, pin_memory=self.device.type == "cuda",
                                       persistent_workers=workers > 0)
        self.val_loader = self._eval_loader(self.split.val, args.val_images)
        self.test_loader = self._eval_loader(self.split.test, args.test_images)

    def _eval_loader(self, paths, max_images):
        # Deterministic tiles at native resolution (an image smaller than a tile is centre-fitted), spread
        # over all the images: a few tiles from every held-out photo rather than many from the first.
        tiles = max(1, math.ceil(max_images / len(paths)))
        dataset = ImageFolderDataset(paths, self.eval_size, mode="grid", max_tiles_per_image=tiles)
        return DataLoader(dataset, self.args.batch_size, shuffle=False)

    def _build_models(self, checkpoint):
        args = self.args
        if checkpoint:
            source = str(self.run.last_checkpoint)
            enc_cfg = config_from_dict(StampEncoderConfig, checkpoint["encoder_config"], source)
            scan_cfg = config_from_dict(ScannerConfig, checkpoint["scanner_config"], source)
        else:
            enc_cfg = StampEncoderConfig(width=args.encoder_width, max_residual=args.max_residual)
            scan_cfg = ScannerConfig(arch=args.scanner)
        self.encoder = StampEncoder(enc_cfg).to(self.device)
        self.scanner = Scanner(scan_cfg).to(self.device)
        params = list(self.encoder.parameters()) + list(self.scanner.parameters())
        self.optimizer = torch.optim.Adam(params, lr=args.lr)
        gamma = args.lr_decay ** (1.0 / args.lr_decay_steps)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=gamma)
        # fp16 needs loss scaling; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype(self.device) == torch.float16)

    def _resume(self, checkpoint):
        self.encoder.load_state_dict(checkpoint["encoder"])
        self.scanner.load_state_dict(checkpoint["scanner"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"])
        before, now = checkpoint.get("args", {}), vars(self.args)
        changed = [f"--{k} {before[k]} → {now[k]}" for k in sorted(now)
                   if k in before and k not in RESUMABLE_FLAGS and before[k] != now[k]]
        self.log(f"resuming {self.run.root} at step {self.start_step} (of {self.args.max_step})")
        if changed:
            self.log("warning: flags differ from the checkpoint's run; the model keeps its saved architecture: "
                     + ", ".join(changed))

    def save(self, step: int) -> None:
        save_checkpoint({
            "step": step,
            "encoder": self.encoder.state_dict(), "scanner": self.scanner.state_dict(),
            "encoder_config": asdict(self.encoder.config), "scanner_config": asdict(self.scanner.config),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": rng_state(),
            "args": {k: v for k, v in vars(self.args).items() if v is None or isinstance(v, (str, int, float, bool))},
        }, self.run.last_checkpoint)

    # ---------------------------------------------------------------- one step
    def _train_mode(self, step: int) -> None:
        """Train mode, except frozen BatchNorm once bn_freeze_step is reached.

        Trained on batches that are always half stamped, a BatchNorm scanner learns to rank an image against
        the rest of its batch; judged alone, with running statistics, it then misses most stamps (measured at
        64 px after 2,500 CPU steps: 92% accuracy with batch statistics, 36% of stamped crops with running
        ones). Batch statistics are what let the scanner find the faint early stamp at all (a GroupNorm
        scanner never did, and the stamp faded away), so we use them first and freeze them afterwards.
        """
        self.encoder.train()
        self.scanner.train()
        if 0 <= self.bn_freeze_step <= step:
            for m in self.scanner.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def step(self, x: torch.Tensor, step: int) -> dict:
        args = self.args
        self._train_mode(step)
        with autocast(self.device):
            residual = self.encoder(x)
        # The residual is far below bf16's resolution near 1.0: stamp and measure it in fp32.
        residual = residual.float()
        stamped = (x + residual).clamp(0, 1)
        labels = pair_labels(x.shape[0], self.device)
        terms = {}
        loss_a = 0.0
        for view in self.views(torch.cat([x, stamped]), step):
            with autocast(self.device):
                logits = self.scanner(view.images).float()
            ce = F.cross_entropy(logits, labels)
            loss_a = loss_a + view.weight * ce
            terms[f"L_A/{view.name}"] = ce.detach()
            terms[f"acc/{view.name}"] = (logits.detach().argmax(1) == labels).float().mean()
        loss_rr = residual_regularisation(stamped, x, residual, args.l1_w)
        loss_ps = perceptual_loss(self.lpips, stamped, x) if self.lpips is not None else torch.zeros((), device=self.device)
        ramp = image_loss_ramp(step, args.warmup_steps, args.ramp_steps)
        loss = ramp * (args.img_w * loss_rr + args.lps_w * loss_ps) + args.acc_w * loss_a

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

        mse = (stamped.detach() - x).pow(2).mean()
        terms.update({"loss/total": loss.detach(), "loss/L_rr": loss_rr.detach(), "loss/L_ps": loss_ps.detach(),
                      "loss/L_A": loss_a.detach(), "train/psnr": -10 * torch.log10(mse.clamp_min(1e-12))})
        return terms

    # ---------------------------------------------------------------- validation
    def validate(self, step: int) -> dict:
        metrics = evaluate(self.encoder, self.scanner, self.val_loader, self.device, max_images=self.args.val_images,
                           views=self.views, step=step)
        for key, value in metrics.items():
            if key != "n":
                self.writer.add_scalar(f"val/{key}", value, step)
        x = next(iter(self.val_loader))[:4].to(self.device)
        self.encoder.eval()
        with torch.no_grad():
            residual = self.encoder(x).float()
        self.encoder.train()
        stamped = (x + residual).clamp(0, 1)
        grid = make_grid(preview_rows(x, stamped, residual), nrow=x.shape[0])
        self.writer.add_image("val/original | stamped | residual (amplified)", grid, step)
        with torch.no_grad():
            for view in self.views(torch.cat([x, stamped]), step):
                if view.name != "plain":
                    # what the scanner trains on: clean above, stamped below (noise clipped for display)
                    grid = make_grid(view.images.float().clamp(0, 1), nrow=x.shape[0])
                    self.writer.add_image(f"val/view {view.name}: clean | stamped", grid, step)
        return metrics


def train(args, views: ViewFn = plain_view, log=print) -> dict:
    """Train (or resume) the run named by args.run_name up to args.max_step; return the summary dict."""
    r = _Run(args, views, log)
    args, device = r.args, r.device
    log(f"device: {device}" + (f", AMP {amp_dtype(device)}" if amp_dtype(device) else "")
        + f"; encoder {r.encoder.config}; scanner {r.scanner.config}")
    batches = _forever(r.train_loader)
    step = r.start_step
    sums, n_sum = defaultdict(float), 0
    val = {}
    t0, images_seen = time.time(), 0
    bar = tqdm(total=args.max_step, initial=step, desc=args.run_name, dynamic_ncols=True, file=sys.stderr,
               disable=step >= args.max_step)
    r.encoder.train(), r.scanner.train()
    try:
        while step < args.max_step:
            x = next(batches).to(device, non_blocking=True)
            terms = r.step(x, step)
            step += 1
            images_seen += x.shape[0]
            bar.update(1)
            for k, v in terms.items():
                sums[k] = sums[k] + v  # stays on the device: no synchronisation until we log
            n_sum += 1
            if step % args.log_every == 0 or step == args.max_step:
                means = {k: (v / n_sum).item() for k, v in sums.items()}
                for k, v in means.items():
                    r.writer.add_scalar(k, v, step)
                r.writer.add_scalar("lr", r.scheduler.get_last_lr()[0], step)
                r.writer.add_scalar("image_loss_ramp", image_loss_ramp(step, args.warmup_steps, args.ramp_steps), step)
                bar.set_postfix({"loss": f"{means['loss/total']:.3g}", "psnr": f"{means['train/psnr']:.1f}",
                                 **{k[4:]: f"{v:.2f}" for k, v in means.items() if k.startswith("acc/")}})
                if not all(math.isfinite(v) for v in means.values()):
                    bad = [k for k, v in means.items() if not math.isfinite(v)]
                    raise FloatingPointError(f"non-finite {', '.join(bad)} at step {step}; the last checkpoint "
                                             f"({r.run.last_checkpoint}) is kept, nothing was saved after it")
                sums, n_sum = defaultdict(float), 0
            if step % args.val_every == 0 or step == args.max_step:
                val = r.validate(step)
                by_view = "".join(f", {k[4:]} {v:.3f}" for k, v in val.items() if k.startswith("acc/"))
                bar.write(f"step {step}: val acc {val['acc']:.3f} (clean {val['acc_clean']:.3f}, stamped "
                          f"{val['acc_stamped']:.3f}{by_view}), PSNR {val['psnr']:.2f} dB, SSIM {val['ssim']:.4f}")
            if step % args.save_every == 0 or step == args.max_step:
                r.save(step)
    except KeyboardInterrupt:
        bar.close()
        r.save(step)
        log(f"\ninterrupted at step {step}; saved {r.run.last_checkpoint}. Run the same command to resume.")
        raise SystemExit(130)
    bar.close()
    train_seconds = time.time() - t0
    return _finish(r, step, train_seconds, images_seen, val)


def _finish(r: _Run, step: int, train_seconds: float, images_seen: int, val: dict) -> dict:
    """Held-out evaluation, exported weights, a preview picture and the printed summary."""
    args, log, device = r.args, r.log, r.device
    test = evaluate(r.encoder, r.scanner, r.test_loader, device, max_images=args.test_images, views=r.views, step=step)
    photos = ImageFolderDataset(r.split.test[:4], args.image_size, mode="full")
    full = evaluate(r.encoder, r.scanner, DataLoader(photos, batch_size=1), device)
    preview_path = r.run.eval / "preview.png"
    preview = save_preview(r.encoder, photos[0].to(device), preview_path)
    for key, value in test.items():
        if key != "n":
            r.writer.add_scalar(f"test/{key}", value, step)
    r.writer.close()
    summary = {
        "run": str(r.run.root), "step": step, "train_seconds_this_session": round(train_seconds, 1),
        "train_images_per_second": round(images_seen / train_seconds, 2) if images_seen else None,
        "device": str(device), "lpips": r.lpips is not None,
        "test_crops": test, "test_photos_native_resolution": full,
        "preview": {"path": str(preview_path), "photo": str(photos.paths[0]), **preview},
    }
    save_pretrained(r.run.model, r.encoder, r.scanner, extra={"step": step, "test_crops": test})
    (r.run.eval / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    speed = (f"{images_seen} images in {train_seconds:.0f} s ({summary['train_images_per_second']} img/s)"
             if images_seen else "no training this session")
    log("\n".join([
        "",
        f"== {args.run_name}: step {step} of {args.max_step}; {speed} on {device}",
        _metrics_line(f"held-out crops ({test['n']} of {r.eval_size}x{r.eval_size})", test),
        _metrics_line(f"held-out photos ({full['n']}, native resolution)", full),
        f"   residual border/interior energy ratio: {test['border_ratio']:.2f} on crops, "
        f"{full['border_ratio']:.2f} on photos (about 1 = spread evenly; large = hidden in a border stripe)",
        f"   LPIPS: {'in the loss' if r.lpips is not None else 'unavailable (AlexNet weights missing), not used'}",
        f"   picture (original | stamped | amplified residual): {preview_path}",
        f"   weights: {r.run.model}/   checkpoint: {r.run.last_checkpoint}   summary: {r.run.eval / 'summary.json'}",
        f"   curves and images: tensorboard --logdir {r.run.tb}",
    ]))
    return summary


def _metrics_line(label: str, m: dict) -> str:
    by_view = "".join(f", {k[4:]} {100 * v:.1f}%" for k, v in m.items() if k.startswith("acc/"))
    return (f"   {label}: PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f}, accuracy clean {100 * m['acc_clean']:.1f}% "
            f"/ stamped {100 * m['acc_stamped']:.1f}%{by_view}")


def run_cli(parser, args, views: ViewFn) -> dict:
    """train() for a script: a bad flag, file or folder ends in one line naming it, not a traceback."""
    try:
        return train(args, views)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
