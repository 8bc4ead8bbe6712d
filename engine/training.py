"""The one training loop behind train.py, train_rs.py and train_rs_aug.py.

The scripts differ only in the *views* of the pair [x, x'] that the scanner learns to classify: a view
function maps (pair (2B,3,H,W), step) to a list of `View`s. Everything else lives here: device and AMP,
seeding, data, losses, warm-up, checkpoints and resumption, TensorBoard, progress, validation, summary, and
data-parallel training under torchrun (engine.distributed).
"""
from __future__ import annotations

import importlib
import json
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid
from tqdm import tqdm

from datasets import ImageFolderDataset, resolve_image_paths, split_files, to_unit_float
from models import Scanner, ScannerConfig, StampEncoder, StampEncoderConfig, save_pretrained
from models.io import config_from_dict, load_pretrained, pretrained_dir

from . import distributed
from .checkpoint import load_resume_checkpoint, save_checkpoint
from .cli import RESUMABLE_FLAGS
from .device import (amp_dtype, autocast, configure_speed, rng_state, seed_everything, set_rng_state,
                     use_channels_last)
from .distributed import Dist, StopRequest, all_gather_object, all_reduce_mean
from .evaluation import evaluate, preview_rows, save_preview
from .losses import View, flat_weighted_mse, load_lpips, pair_labels, perceptual_loss, residual_regularisation
from .recipes import MIRFLICKR_DIR
from .rundir import RunDir

ViewFn = Callable[[torch.Tensor, int], list[View]]


def plain_view(weight: float = 1.0) -> ViewFn:
    """The baseline: the scanner sees [x, x'] as they are, with `weight` in L_A (the original's rs_w)."""
    def view(pair: torch.Tensor, step: int) -> list[View]:
        return [View("plain", pair, weight)]
    return view


def random_grid_shift(images: torch.Tensor, most: int) -> torch.Tensor:
    """(B,C,H,W) → (B,C,H−most,W−most): each image cropped at its own random offset (dy, dx) in 0..most, by
    integer indexing: the pixels move on the grid and are not resampled. Written here rather than with kornia's
    RandomCrop(cropping_mode="slice"), which reads its offsets back to the host (a sync per step on CUDA) and
    returns channels-first memory; these offsets stay on the device and the result is channels-last."""
    if most == 0:
        return images
    batch, height, width = images.shape[0], images.shape[-2] - most, images.shape[-1] - most
    dy, dx = torch.randint(0, most + 1, (2, batch, 1), device=images.device)
    rows = (dy + torch.arange(height, device=images.device))[:, :, None]  # (B,h,1)
    columns = (dx + torch.arange(width, device=images.device))[:, None, :]  # (B,1,w)
    picked = images.permute(0, 2, 3, 1)[torch.arange(batch, device=images.device)[:, None, None], rows, columns]
    return picked.permute(0, 3, 1, 2)  # (B,h,w,C) memory: channels-last


def combine_views(*view_fns: ViewFn) -> ViewFn:
    """One view function that returns the views of all of `view_fns`, in order."""
    def views(pair: torch.Tensor, step: int) -> list[View]:
        return [v for fn in view_fns for v in fn(pair, step)]
    return views


def ramp(step: int, start: int, end: int, slope: float = 1.0) -> float:
    """The original's weight ramp, clip(slope·(step − start)/(end − start), 0, 1): 0 up to `start`, 1 from
    `end` on with slope 1 (from start + (end − start)/slope in general); a step at `start` when start == end."""
    if end <= start:
        return 1.0 if step >= start else 0.0
    return min(max(slope * (step - start) / (end - start), 0.0), 1.0)


def image_loss_ramp(step: int, warmup_steps: int, ramp_steps: int, slope: float = 1.0) -> float:
    """Weight factor of the image losses: 0 for warmup_steps, then linear to 1 over ramp_steps (slope times
    faster: the original's img_w·step)."""
    return ramp(step, warmup_steps, warmup_steps + ramp_steps, slope)


class _Pair(nn.Module):
    """Encoder and scanner behind one forward, so that DDP wraps a single module called once per step.

    forward(x (B,3,H,W) in [0,1], step) → (unbounded residual u (B,3,H,W) fp32, stamped (B,3,H,W) fp32, [(View,
    logits (2B,C) fp32)]): the encoder and the scanner run under autocast on CUDA when `amp`; u is cast to fp32
    and bounded there (δ = encoder.bound(u, x): shaped by x's JND map when the encoder's config.jnd > 0, u then
    the shaped residual before its bound), as δ is far below bf16's resolution near 1.0. The stamped image is
    x + δ, clamped to [0,1] when `clamp_stamp` (what an image file can hold), unclamped otherwise (the original).
    u, not δ, is what the L1 term regularises (see engine.losses.residual_regularisation). With `grid_shift` S,
    the views start from the pair [x, x'] with each image cropped at its own random offset of 0..S pixels.
    """

    def __init__(self, encoder: StampEncoder, scanner: Scanner, views: ViewFn, device: torch.device,
                 clamp_stamp: bool = True, amp: bool = True, grid_shift: int = 0):
        super().__init__()
        self.encoder, self.scanner = encoder, scanner
        self.views, self.device, self.clamp_stamp, self.amp = views, device, clamp_stamp, amp
        self.grid_shift = grid_shift

    def forward(self, x: torch.Tensor, step: int):
        with autocast(self.device, self.amp):
            unbounded = self.encoder(x, bounded=False)
        unbounded = unbounded.float()
        stamped = x + self.encoder.bound(unbounded, x)
        if self.clamp_stamp:
            stamped = stamped.clamp(0, 1)
        outputs = []
        for view in self.views(random_grid_shift(torch.cat([x, stamped]), self.grid_shift), step):
            with autocast(self.device, self.amp):
                outputs.append((view, self.scanner(view.images).float()))
        return unbounded, stamped, outputs


class Trainer:
    """The models, their optimiser and one training step: what `train` runs, and what bench.py times.

    Args:
        args: the parsed flags of a training script (engine.cli.build_parser, plus the script's own).
        views: the script's view function.
        device: where to train (engine.device.pick_device or engine.distributed.setup).
        dist: this process's place under torchrun (engine.distributed.Dist); the default is a single process.
        checkpoint: a loaded checkpoint (engine.checkpoint.load_checkpoint) to resume from, or None.
        steps_per_epoch: steps in one pass over the training split; with --lr_decay_unit epoch the learning
            rate decays once every this many steps.

    Under torchrun the encoder and the scanner sit in one `_Pair` wrapped in one DistributedDataParallel
    (`self.model`); `self.encoder` and `self.scanner` stay the bare modules that evaluation and export use.
    Speed settings from the flags: channels_last (`--channels_last`), torch.compile (`--compile`), fused Adam
    and fp16 loss scaling on CUDA (fused Adam reads the scaler's inf flag on the GPU: no host sync per step).
    """

    def __init__(self, args, views: ViewFn, device: torch.device, dist: Dist = Dist(), checkpoint: dict | None = None,
                 log=print, steps_per_epoch: int = 1):
        self.args, self.views, self.device, self.dist, self.log = args, views, device, dist, log
        self.amp = args.amp == "on"
        self.channels_last = use_channels_last(args, device)
        init = None
        if checkpoint:
            enc_cfg = config_from_dict(StampEncoderConfig, checkpoint["encoder_config"], "checkpoint")
            scan_cfg = config_from_dict(ScannerConfig, checkpoint["scanner_config"], "checkpoint")
        elif getattr(args, "init_from", None):
            init = load_pretrained(pretrained_dir(args.init_from))
            if init[0] is None:
                raise ValueError(f"--init_from {args.init_from}: holds a scanner only (no encoder to fine-tune)")
            enc_cfg, scan_cfg = init[0].config, init[1].config
            # Perceptual shaping is a training choice, not architecture (no weights): --jnd sets it for the fine-tune.
            enc_cfg = replace(enc_cfg, jnd=getattr(args, "jnd", enc_cfg.jnd))
            log(f"fine-tuning from {args.init_from}: its architecture (encoder {enc_cfg}, scanner {scan_cfg}) and "
                f"weights; --encoder, --encoder_width, --max_residual, --padding_mode and --scanner are not used"
                + (f"; --jnd {enc_cfg.jnd} replaces its perceptual shaping ({init[0].config.jnd})"
                   if enc_cfg.jnd != init[0].config.jnd else ""))
        else:
            enc_cfg = StampEncoderConfig(width=args.encoder_width, max_residual=args.max_residual,
                                         padding_mode=args.padding_mode, arch=args.encoder)
            enc_cfg = replace(enc_cfg, jnd=getattr(args, "jnd", 0.0))  # perceptual shaping (models.jnd)
            scan_cfg = ScannerConfig(arch=args.scanner, padding_mode=args.padding_mode)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.encoder = StampEncoder(enc_cfg).to(self.device, memory_format=memory_format)
        self.scanner = Scanner(scan_cfg).to(self.device, memory_format=memory_format)
        sizes = {args.image_size, args.eval_size or args.image_size}
        for name, module in (("encoder", self.encoder), ("scanner", self.scanner)):
            if module.input_size is not None and sizes != {module.input_size}:
                raise ValueError(f"--{name} {module.config.arch} takes {module.input_size}x{module.input_size} images "
                                 f"only: use --image_size {module.input_size} (with --train_crop fit for whole "
                                 f"photos), or a fully convolutional --{name}")
        if args.grid_shift and (args.grid_shift >= args.image_size or self.scanner.input_size is not None):
            raise ValueError(f"--grid_shift {args.grid_shift}: needs a fully convolutional scanner (--scanner, or "
                             f"--init_from's) and training images larger than the shift (--image_size "
                             f"{args.image_size})")
        # One parameter group per network, as the original (the same learning rate: Adam's update is per parameter).
        groups = [{"params": self.encoder.parameters()}, {"params": self.scanner.parameters()}]
        self.optimizer = torch.optim.Adam(groups, lr=args.lr, fused=device.type == "cuda")
        gamma = args.lr_decay ** (1.0 / args.lr_decay_steps)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=gamma)
        #: the scheduler steps after every step, or after the last step of each epoch
        self.lr_every = steps_per_epoch if args.lr_decay_unit == "epoch" else 1
        # fp16 needs loss scaling; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and amp_dtype(self.device) == torch.float16)
        self.lpips = load_lpips(self.device, log) if args.lps_w > 0 else None
        self.yuv_weights = (args.y_scale, args.u_scale, args.v_scale)
        self.photo_shift = (K.RandomRGBShift(args.photo_shift, args.photo_shift, args.photo_shift, p=1.0)
                            if args.photo_shift > 0 else None)
        self.ramp_slope = args.img_w if args.ramp_scaled_by_img_w else 1.0
        self.bn_freeze_step = (args.warmup_steps + args.ramp_steps if args.bn_freeze_step is None
                               else args.bn_freeze_step)
        if checkpoint:
            self.load(checkpoint)
        elif init:
            self.encoder.load_state_dict(init[0].state_dict())
            self.scanner.load_state_dict(init[1].state_dict())
        if getattr(args, "compile", False):
            # Inductor's layout optimisation turns the convolutions channels_last on its own and then trips over
            # replication_pad2d_backward's contiguous gradient (see use_channels_last): keep the layout we chose.
            importlib.import_module("torch._inductor.config").layout_optimization = False
            # In place (state_dict keys unchanged); evaluation at other sizes recompiles once, with dynamic shapes.
            self.encoder.compile()
            self.scanner.compile()
        self.model = _Pair(self.encoder, self.scanner, views, device, args.clamp_stamp, self.amp, args.grid_shift)
        if dist.enabled:
            # Per-rank BatchNorm, not SyncBatchNorm (see docs/training.md, several GPUs); rank 0's buffers (the
            # running statistics) are copied to the others before each forward. Every parameter takes part in
            # every step, so find_unused_parameters stays off. That copy is DDP's default, and no keyword asks for
            # it: torch 2.11 (the GPU machines') names it broadcast_buffers (default True) and has no
            # forward_sync_buffers (TypeError); torch 2.13 on names it forward_sync_buffers (default None, meaning
            # True) and warns that broadcast_buffers is deprecated. So only keywords torch 2.11 has, and neither
            # of these: tests/test_distributed.py checks them against tests/data/torch_2_11_ddp_parameters.txt.
            device_ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(self.model, device_ids=device_ids, gradient_as_bucket_view=True)

    # ---------------------------------------------------------------- state
    def load(self, checkpoint: dict) -> None:
        """Weights, optimiser, schedule and loss scale from a checkpoint (the RNG is the caller's business)."""
        self.encoder.load_state_dict(checkpoint["encoder"])
        self.scanner.load_state_dict(checkpoint["scanner"])
        load_optimizer_state(self.optimizer, checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        load_scaler_state(self.scaler, checkpoint["scaler"], self.log)

    def state(self, step: int) -> dict:
        """The checkpoint of this trainer at `step`: tensors and plain values only."""
        return {
            "step": step,
            "encoder": self.encoder.state_dict(), "scanner": self.scanner.state_dict(),
            "encoder_config": asdict(self.encoder.config), "scanner_config": asdict(self.scanner.config),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "args": {k: v for k, v in vars(self.args).items() if v is None or isinstance(v, (str, int, float, bool))},
        }

    # ---------------------------------------------------------------- one step
    def _train_mode(self, step: int) -> None:
        """Train mode, except frozen BatchNorm once bn_freeze_step is reached.

        Trained on batches that are always half stamped, a BatchNorm scanner learns to rank an image against
        the rest of its batch; judged alone, with running statistics, it then misses most stamps (measured at
        64 px after 2,500 CPU steps: 92% accuracy with batch statistics, 36% of stamped crops with running
        ones). Batch statistics are what let the scanner find the faint early stamp at all (a GroupNorm
        scanner never did, and the stamp faded away), so we use them first and freeze them afterwards.
        Under torchrun each rank's batch is half clean, half stamped too, and its BatchNorm uses that batch's
        statistics (per-rank, not SyncBatchNorm): the regime that the single-process recipe was tuned in.
        """
        self.encoder.train()
        self.scanner.train()
        if 0 <= self.bn_freeze_step <= step:
            for m in self.scanner.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def step(self, x: torch.Tensor, step: int) -> dict:
        """One optimisation step on a batch x (B,3,H,W) in [0,1] on the trainer's device.

        Returns the step's loss terms and accuracies as 0-d tensors on the device, which the caller reads
        (`.item()`) only when it logs. Nothing here waits for the device (tests/test_cuda_path.py counts it with
        engine.hostsync), except kornia's differentiable JPEG in an augmented view: it reads its quality range
        back to check it (two reads per call; kornia skips them only under torch.compile).
        """
        args = self.args
        self._train_mode(step)
        if self.photo_shift is not None:
            x = self.photo_shift(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        unbounded, stamped, outputs = self.model(x, step)
        labels = pair_labels(x.shape[0], self.device)
        terms = {}
        loss_a = 0.0  # Σ over views of weight · CE: the original's rs_w·CE (+ w_aug·CE_aug in train_rs_aug.py)
        for view, logits in outputs:
            ce = F.cross_entropy(logits, labels)
            loss_a = loss_a + view.weight * ce
            terms[f"L_A/{view.name}"] = ce.detach()
            terms[f"acc/{view.name}"] = (logits.detach().argmax(1) == labels).float().mean()
        loss_rr = residual_regularisation(stamped, x, unbounded, args.l1_w, self.yuv_weights)
        loss_ps = (perceptual_loss(self.lpips, stamped, x) if self.lpips is not None
                   else torch.zeros((), device=self.device))
        weight = image_loss_ramp(step, args.warmup_steps, args.ramp_steps, self.ramp_slope)
        loss = weight * (args.img_w * loss_rr + args.lps_w * loss_ps) + loss_a
        flat_w = getattr(args, "flat_w", 0.0)
        if flat_w > 0:  # perceptual shaping's image loss (engine.losses.flat_weighted_mse), under the same ramp
            loss_flat = flat_weighted_mse(stamped, x, self.yuv_weights)
            loss = loss + weight * args.img_w * flat_w * loss_flat
            terms["loss/L_flat"] = loss_flat.detach()

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if (step + 1) % self.lr_every == 0:
            self.scheduler.step()

        mse = (stamped.detach() - x).pow(2).mean()
        terms.update({"loss/total": loss.detach(), "loss/L_rr": loss_rr.detach(), "loss/L_ps": loss_ps.detach(),
                      "loss/L_A": loss_a.detach(), "train/psnr": -10 * torch.log10(mse.clamp_min(1e-12))})
        return terms


#: Adam's options that say how it runs on this device, not what it computes: a resumed optimiser keeps the ones it
#: was built with here, not the saved ones (a CPU checkpoint would turn fused Adam off on CUDA).
IMPLEMENTATION_OPTIONS = ("foreach", "fused", "capturable", "differentiable")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """optimizer.load_state_dict(state), keeping the implementation options the optimiser was built with.

    torch's load_state_dict takes every option from the saved groups, so a checkpoint written on CPU and resumed
    on CUDA would leave Adam unfused, with its step counts on the CPU. Here the options in IMPLEMENTATION_OPTIONS
    are restored after loading, the step counts go where the implementation wants them (the parameter's device,
    float32, when fused or capturable; the CPU otherwise), and every other state tensor goes to its parameter's
    device in its parameter's memory format (the fused CUDA kernel needs matching strides, and --channels_last
    may have changed since).
    """
    built = [{k: g[k] for k in IMPLEMENTATION_OPTIONS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, options in zip(optimizer.param_groups, built):
        group.update(options)
        on_device = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            p_state = optimizer.state.get(p, {})
            for key, value in p_state.items():
                if not torch.is_tensor(value):
                    continue
                if key == "step":
                    p_state[key] = value.to(device=p.device if on_device else "cpu",
                                            dtype=torch.float32 if on_device else value.dtype)
                elif value.shape == p.shape and (value.device != p.device or value.stride() != p.stride()):
                    p_state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict, log=print) -> None:
    """scaler.load_state_dict(state); a checkpoint without a loss scale (written with the scaler off: on CPU, with
    bf16 or with --amp off) leaves an enabled scaler at its initial scale, with one line saying so."""
    if scaler.is_enabled() and not state:
        log("note: the checkpoint holds no fp16 loss scale (written on CPU, with bf16 or with --amp off): the loss "
            "scale starts afresh")
        return
    scaler.load_state_dict(state)


def default_workers(device: torch.device) -> int:
    """DataLoader workers per process when --workers is not given: none on CPU (they would take the cores that
    train), else this process's share of the cores it may use (the node's, divided among torchrun's
    LOCAL_WORLD_SIZE processes), at most 8 and at least 1."""
    if device.type == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))))


def training_loader(dataset, batch_size: int, sampler, device: torch.device, workers: int | None = None) -> DataLoader:
    """The training DataLoader (the GPU check times it alone): `workers` processes (default_workers when None),
    pinned memory on CUDA so the copy of each uint8 batch overlaps the host, workers kept between passes."""
    workers = workers if workers is not None else default_workers(device)
    return DataLoader(dataset, batch_size, sampler=sampler, drop_last=True, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0)


class _NoWriter:
    """SummaryWriter's interface for the ranks that do not log."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class _Run:
    """The state of one training run; `train` drives it. Under torchrun every rank builds one; only rank 0 (dist
    .is_main) creates the run folder, logs and writes."""

    def __init__(self, args, views: ViewFn, dist: Dist, device: torch.device, log=print):
        self.args, self.views, self.dist, self.device, self.log = args, views, dist, device, log
        configure_speed(device)
        self.run = RunDir.create(args.results_dir, args.run_name, make=dist.is_main)
        # Every rank reads the checkpoint before any step, hence before rank 0 can write the next one. Under
        # torchrun rank 0 decides the step and every rank must see that checkpoint, or all of them stop with one
        # line (several nodes without a shared results folder); a single process just reads it.
        checkpoint = load_resume_checkpoint(self.run.last_checkpoint, dist)
        self.start_step = checkpoint["step"] if checkpoint else 0
        seed_everything(args.seed + dist.rank)

        self._build_data()
        self.trainer = Trainer(args, views, device, dist, checkpoint, log, steps_per_epoch=self.steps_per_epoch)
        self.encoder, self.scanner, self.lpips = self.trainer.encoder, self.trainer.scanner, self.trainer.lpips
        if checkpoint:
            self._resume(checkpoint)
        if dist.is_main:
            # "architecture": the networks actually built (--init_from's or a checkpoint's, not the flags')
            self.run.write_args({**vars(args), "resumed_from_step": self.start_step, "device_used": str(device),
                                 "world_size": dist.world_size,
                                 "architecture": {"encoder": asdict(self.encoder.config),
                                                  "scanner": asdict(self.scanner.config)}})
            # purge_step drops events a crashed run logged after its last checkpoint, so curves do not fold back.
            self.writer = SummaryWriter(self.run.tb, purge_step=self.start_step or None)
            if self.start_step == 0:
                self.writer.add_text("args", "\n".join(f"    {k} = {v}" for k, v in sorted(vars(args).items())))
        else:
            self.writer = _NoWriter()

    # ---------------------------------------------------------------- set-up
    def _build_data(self):
        args, d = self.args, self.dist
        self.eval_size = args.eval_size or args.image_size
        paths = [p for folder in _train_paths(args.train_path) for p in resolve_image_paths(folder, log=self.log)]
        self.split = split_files(paths, seed=args.split_seed)
        self.log(f"data: {len(self.split.train)} train, {len(self.split.val)} val, {len(self.split.test)} test images")
        if args.max_crop_scale != 1.0 and args.train_crop != "random":
            raise ValueError(f"--max_crop_scale {args.max_crop_scale} needs --train_crop random (not {args.train_crop})")
        # 'fit' is ImageFolderDataset's 'center' mode: centre crop to a square, then resize (ImageOps.fit).
        # uint8 batches: a quarter of float32's bytes in the workers' shared memory and the copy to the device;
        # _train converts them there (to_unit_float). The held-out loaders below stay float32 (evaluate's input).
        train_set = ImageFolderDataset(self.split.train, args.image_size,
                                       mode="random" if args.train_crop == "random" else "center",
                                       max_crop_scale=args.max_crop_scale, dtype=torch.uint8)
        # An epoch is one pass over the training split (the last partial batch dropped), as in the original.
        self.steps_per_epoch = max(1, len(self.split.train) // (args.batch_size * d.world_size))
        self.stop_step = args.max_step
        if args.max_epoch is not None and args.max_epoch * self.steps_per_epoch < args.max_step:
            self.stop_step = args.max_epoch * self.steps_per_epoch
            self.log(f"--max_epoch {args.max_epoch} stops this run at step {self.stop_step} "
                     f"({self.steps_per_epoch} steps per epoch), before --max_step {args.max_step}")
        # At least 50 batches per pass, so tiny folders do not restart the loader every few steps.
        per_pass = max(len(train_set), 50 * args.batch_size * d.world_size)
        if d.enabled:
            # Each rank takes its own 1/world_size of a shuffled pass; the sampler's seed is the run's (the same on
            # every rank, or the shares would overlap), and set_epoch reshuffles each pass (see batches).
            self.sampler = DistributedSampler(_Repeated(train_set, per_pass), num_replicas=d.world_size, rank=d.rank,
                                              shuffle=True, seed=args.seed, drop_last=True)
            dataset = self.sampler.dataset
        else:
            self.sampler = RandomSampler(train_set, num_samples=per_pass)
            dataset = train_set
        self.train_loader = training_loader(dataset, args.batch_size, self.sampler, self.device, args.workers)
        if d.is_main:
            self.val_loader = self._eval_loader(self.split.val, args.val_images)
            self.test_loader = self._eval_loader(self.split.test, args.test_images)

    def _eval_loader(self, paths, max_images):
        if self.args.train_crop == "fit":
            # Each held-out photo fitted whole, as the run trains (and as the original tests).
            dataset = ImageFolderDataset(paths, self.eval_size, mode="center")
            return DataLoader(dataset, self.args.batch_size, shuffle=False)
        # Deterministic tiles at native resolution (an image smaller than a tile is centre-fitted), spread
        # over all the images: a few tiles from every held-out photo rather than many from the first.
        tiles = max(1, math.ceil(max_images / len(paths)))
        dataset = ImageFolderDataset(paths, self.eval_size, mode="grid", max_tiles_per_image=tiles)
        return DataLoader(dataset, self.args.batch_size, shuffle=False)

    def batches(self):
        """Training batches forever; a new shuffled pass (set_epoch under torchrun) each time one ends."""
        epoch = self.start_step // max(1, len(self.train_loader))
        while True:
            if isinstance(self.sampler, DistributedSampler):
                self.sampler.set_epoch(epoch)
            yield from self.train_loader
            epoch += 1

    def _resume(self, checkpoint):
        d = self.dist
        ranks = checkpoint.get("rng_ranks")
        if ranks is not None and len(ranks) == d.world_size:
            set_rng_state(ranks[d.rank])  # each rank continues its own random stream
        elif d.world_size == 1:
            set_rng_state(checkpoint["rng"])
        else:
            # A different number of processes than the checkpoint's: fresh streams, distinct per rank and step.
            seed_everything(self.args.seed + d.rank + 1_000_003 * self.start_step)
            self.log(f"note: the checkpoint was written by {len(ranks) if ranks else 1} process(es), this run has "
                     f"{d.world_size}: random streams are reseeded")
        before, now = checkpoint.get("args", {}), vars(self.args)
        changed = [f"--{k} {before[k]} → {now[k]}" for k in sorted(now)
                   if k in before and k not in RESUMABLE_FLAGS and before[k] != now[k]]
        self.log(f"resuming {self.run.root} at step {self.start_step} (of {self.args.max_step})")
        if changed:
            self.log("warning: flags differ from the checkpoint's run; the model keeps its saved architecture: "
                     + ", ".join(changed))
        # Flags added to the code after the checkpoint was written take their values (a recipe's, perhaps) from now
        # on: say so, as a resumed run's loss changes with them (e.g. --flat_w). The encoder's --jnd is its saved one.
        added = [f"--{k} {now[k]}" for k in sorted(now) if before and k not in before and k not in RESUMABLE_FLAGS
                 and (now[k] is None or isinstance(now[k], (str, int, float, bool)))]
        if added:
            self.log(f"note: flags newer than the checkpoint apply from step {self.start_step}: " + ", ".join(added)
                     + f" (the encoder keeps its saved perceptual shaping, jnd {self.encoder.config.jnd})")

    def save(self, step: int, collective: bool = True) -> None:
        """Rank 0 writes the checkpoint. With `collective` every rank must call this (their RNG states are
        gathered, so that a resumed run continues each rank's stream); without, rank 0 alone (Ctrl-C)."""
        ranks = all_gather_object(self.dist, rng_state()) if collective else None
        if self.dist.is_main:
            state = self.trainer.state(step)
            state["rng"] = rng_state()
            if ranks is not None and self.dist.enabled:
                state["rng_ranks"] = ranks
            save_checkpoint(state, self.run.last_checkpoint)

    # ---------------------------------------------------------------- validation (rank 0)
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


class _Repeated(torch.utils.data.Dataset):
    """`dataset` repeated up to `length` items (item i is dataset[i % len(dataset)])."""

    def __init__(self, dataset, length: int):
        self.dataset, self.length = dataset, length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return self.dataset[i % len(self.dataset)]


def _quiet(*args, **kwargs):
    pass


def _train_paths(value) -> list:
    """--train_path (one folder, or a list of them) → what datasets.resolve_image_paths takes, one per folder."""
    folders = [value] if value is None or isinstance(value, (str, Path)) else list(value)
    if len(set(map(str, folders))) != len(folders):
        raise ValueError(f"--train_path: a folder is named twice ({' '.join(map(str, folders))})")
    return [_train_path(folder) for folder in folders]


def _train_path(path):
    """One --train_path → what datasets.resolve_image_paths takes: None for the bundled photos ('bundled', unless
    a folder of that name exists); the original's default ./mirflickr/, when missing, is explained in one line."""
    if path is None or (path == "bundled" and not Path(path).exists()):
        return None
    if path == MIRFLICKR_DIR and not Path(path).is_dir():
        raise FileNotFoundError(
            f"{MIRFLICKR_DIR}: not found. The original recipe trains on MIRFlickr-25k in ./mirflickr/: download "
            f"mirflickr25k.zip from https://press.liacs.nl/mirflickr/ and unzip it here, or pass --train_path to a "
            f"folder prepared with `python -m datasets.prepare` (docs/data.md); to try it on "
            f"the photos scikit-image ships, pass --train_path bundled")
    return path


def train(args, views: ViewFn | None = None, log=print) -> dict | None:
    """Train (or resume) the run named by args.run_name up to args.max_step; return the summary dict.

    Under torchrun (RANK set) every process trains data-parallel and returns None, except rank 0, which alone
    logs, validates, writes checkpoints, exports and returns the summary.
    """
    d, device = distributed.setup(args.device)
    stop = StopRequest(d)  # first thing, so that a Ctrl-C or SIGTERM during set-up is honoured after the first step
    try:
        return _train(args, views or plain_view(), d, device, log if d.is_main else _quiet, stop)
    finally:
        stop.restore()
        distributed.teardown(d)


def _train(args, views: ViewFn, d: Dist, device: torch.device, log, stop: StopRequest) -> dict | None:
    r = _Run(args, views, d, device, log)
    log(f"recipe: {args.recipe}" + (f" (overridden: {', '.join('--' + k for k in args.recipe_overrides)})"
                                    if getattr(args, "recipe_overrides", None) else ""))
    log(f"device: {device}" + (f", AMP {amp_dtype(device)}" if r.trainer.amp and amp_dtype(device) else "")
        + (f"; {d.world_size} processes (torchrun, {'nccl' if device.type == 'cuda' else 'gloo'})" if d.enabled else "")
        + f"; encoder {r.encoder.config}; scanner {r.scanner.config}"
        + ("; channels_last" if r.trainer.channels_last else "")
        + ("; torch.compile" if getattr(args, "compile", False) else ""))
    batches = r.batches()
    step = r.start_step
    sums, n_sum = defaultdict(float), defaultdict(int)  # per term: its sum and its steps in this log interval
    finite, interval_start = [], step  # per step: (its terms, which were finite), named when one is not
    saved = step if r.run.last_checkpoint.exists() else None
    val = {}
    t0, images_seen = time.time(), 0
    warm = None  # (time, images seen) once --speed_warmup steps have run: the after-warm-up images/s starts there
    bar = tqdm(total=r.stop_step, initial=step, desc=args.run_name, dynamic_ncols=True, file=sys.stderr,
               disable=step >= r.stop_step or not d.is_main)
    try:
        while step < r.stop_step:
            x = to_unit_float(next(batches), device)  # uint8 → float32 in [0, 1] on the device, after the copy
            terms = r.trainer.step(x, step)
            step += 1
            images_seen += x.shape[0] * d.world_size
            if step - r.start_step == args.speed_warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # once per run: the clock starts when the warm-up steps are done
                warm = (time.time(), images_seen)
            bar.update(1)
            for k, v in terms.items():
                sums[k] = sums[k] + v  # stays on the device: no synchronisation until we log
                n_sum[k] += 1  # a term can join mid-interval (the augmented view at --aug_start)
            names = sorted(terms)
            finite.append((names, torch.stack([torch.as_tensor(terms[k]).isfinite() for k in names])))
            if (step % args.log_every == 0 or step == r.stop_step or step % args.save_every == 0
                    or (stop.requested and not d.enabled)):
                # The one synchronisation point, and always one before a checkpoint is written: the means over
                # the interval and over the ranks, whether the weights are still finite (a non-finite gradient
                # can leave the loss finite), and whether any rank was asked to stop (so that all of them stop
                # here, together; a single process stops after the step in which the signal came).
                keys = sorted(sums)
                weights_finite = torch.stack([t.isfinite().all() for m in (r.encoder, r.scanner)
                                              for t in m.state_dict().values() if t.is_floating_point()]).all()
                packed = torch.stack([torch.as_tensor(sums[k], device=device, dtype=torch.float32) / n_sum[k]
                                      for k in keys] + [torch.tensor(float(stop.requested), device=device),
                                                        (~weights_finite).float()])
                packed = all_reduce_mean(d, packed).tolist()
                means, stop_requested, weights_bad = dict(zip(keys, packed[:-2])), packed[-2] > 0, packed[-1] > 0
                for k, v in means.items():
                    r.writer.add_scalar(k, v, step)
                r.writer.add_scalar("lr", r.trainer.scheduler.get_last_lr()[0], step)
                r.writer.add_scalar("image_loss_ramp", image_loss_ramp(step, args.warmup_steps, args.ramp_steps,
                                                                       r.trainer.ramp_slope), step)
                bar.set_postfix({"loss": f"{means['loss/total']:.3g}", "psnr": f"{means['train/psnr']:.1f}",
                                 **{k[4:]: f"{v:.2f}" for k, v in means.items() if k.startswith("acc/")}})
                if weights_bad or not all(math.isfinite(v) for v in means.values()):
                    bar.close()
                    raise FloatingPointError(_nonfinite(finite, interval_start, step, means, weights_bad)
                                             + (f"; the last checkpoint ({r.run.last_checkpoint}, step {saved}) is "
                                                f"kept, nothing was saved after it" if saved is not None else
                                                "; no checkpoint was saved"))
                sums, n_sum = defaultdict(float), defaultdict(int)
                finite, interval_start = [], step
                if stop_requested:
                    r.save(step)
                    bar.close()
                    log(f"\ninterrupted at step {step}; saved {r.run.last_checkpoint} ({stop.name}). Run the same "
                        f"command to resume from step {step}.")
                    raise SystemExit(stop.exit_status)
            if d.is_main and (step % args.val_every == 0 or step == r.stop_step):
                # Rank 0 alone; the others wait for it in the next step's gradient all-reduce.
                val = r.validate(step)
                by_view = "".join(f", {k[4:]} {v:.3f}" for k, v in val.items() if k.startswith("acc/"))
                photos = len(r.split.val)
                # The counts go with the figures: a validation split of one or two photos (the bundled photos give
                # one) swings between 0 and 1 and says little; the held-out test figures at the end say more.
                bar.write(f"step {step}: validation on {val['n']} crops of {photos} photo{'s' * (photos != 1)}: acc "
                          f"{val['acc']:.3f} (clean {val['acc_clean']:.3f}, stamped {val['acc_stamped']:.3f}"
                          f"{by_view}), PSNR {val['psnr']:.2f} dB, SSIM {val['ssim']:.4f}")
            if step % args.save_every == 0 or step == r.stop_step:
                r.save(step)
                saved = step
    except KeyboardInterrupt:
        # A second signal (StopRequest): stop now, mid-step perhaps, so save nothing; last.pt is whole (atomic).
        bar.close()
        log(f"\ninterrupted again at step {step}: not saved; the same command resumes from {r.run.last_checkpoint}"
            + (f" (step {saved})" if saved is not None else " (none yet: it starts over)"))
        raise SystemExit(130)
    stop.restore()  # from here on (evaluation, export) Ctrl-C stops at once: the last checkpoint is saved
    bar.close()
    train_seconds = time.time() - t0
    after_warmup = (images_seen - warm[1]) / (time.time() - warm[0]) if warm and images_seen > warm[1] else None
    if not d.is_main:
        return None  # rank 0 alone evaluates and exports; nothing else needs this rank
    return _finish(r, step, train_seconds, images_seen, val, after_warmup)


def _finish(r: _Run, step: int, train_seconds: float, images_seen: int, val: dict,
            after_warmup: float | None = None) -> dict:
    """Held-out evaluation, exported weights, a preview picture and the printed summary."""
    args, log, device = r.args, r.log, r.device
    test = evaluate(r.encoder, r.scanner, r.test_loader, device, max_images=args.test_images, views=r.views, step=step)
    fixed = r.encoder.input_size or r.scanner.input_size
    photos = (ImageFolderDataset(r.split.test[:4], fixed, mode="center") if fixed  # fitted, as the models need
              else ImageFolderDataset(r.split.test[:4], args.image_size, mode="full"))
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
        # from the end of step --speed_warmup to the end of training (validation and checkpoints included)
        "train_images_per_second_after_warmup": round(after_warmup, 2) if after_warmup else None,
        "speed_warmup_steps": args.speed_warmup,
        "device": str(device), "processes": r.dist.world_size, "lpips": r.lpips is not None,
        "test_crops": test, "test_photos_native_resolution": full,
        "preview": {"path": str(preview_path), "photo": str(photos.paths[0]), **preview},
    }
    save_pretrained(r.run.model, r.encoder, r.scanner,
                    extra={"step": step, "test_crops": test, "sigma": getattr(args, "std", None)})
    (r.run.eval / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    speed = (f"{images_seen} images in {train_seconds:.0f} s ({summary['train_images_per_second']} img/s)"
             if images_seen else "no training this session")
    where = f"{device}" + (f" (rank 0 of {r.dist.world_size} processes)" if r.dist.enabled else "")
    log("\n".join([
        "",
        f"== {args.run_name} (recipe {args.recipe}): step {step} of {r.stop_step}; {speed} on {where}",
        _metrics_line(f"held-out photos fit to {r.eval_size}x{r.eval_size} ({test['n']})" if args.train_crop == "fit"
                      else f"held-out crops ({test['n']} of {r.eval_size}x{r.eval_size})", test),
        _metrics_line(f"held-out photos ({full['n']}, {f'fit to {fixed}x{fixed}' if fixed else 'native resolution'})",
                      full),
        f"   residual border/interior energy ratio: {test['border_ratio']:.2f} on crops, "
        f"{full['border_ratio']:.2f} on photos (about 1 = spread evenly; large = hidden in a border stripe)",
        f"   LPIPS: {'in the loss' if r.lpips is not None else 'unavailable (AlexNet weights missing), not used'}",
        f"   picture (original | stamped | amplified residual): {preview_path}",
        f"   weights: {r.run.model}/   checkpoint: {r.run.last_checkpoint}   summary: {r.run.eval / 'summary.json'}",
        f"   curves and images: tensorboard --logdir {r.run.tb}",
    ]))
    return summary


def _nonfinite(finite: list, start: int, step: int, means: dict, weights_bad: bool) -> str:
    """What went non-finite, and at which step: from this rank's per-step flags (one (names of the step's terms,
    (terms,) bool tensor) per step since step `start`; the terms may differ from step to step), else from the
    means over the ranks, else the weights."""
    flags = torch.cat([f for _, f in finite]).tolist() if finite else []  # one read of the device
    at = 0
    for row, (names, _) in enumerate(finite):
        ok, at = flags[at:at + len(names)], at + len(names)
        if not all(ok):
            bad = [k for k, good in zip(names, ok) if not good]
            return f"non-finite {', '.join(bad)} at step {start + row + 1}"
    bad = [k for k, v in means.items() if not math.isfinite(v)]
    if bad:
        return f"non-finite {', '.join(bad)} in steps {start + 1}-{step} (on another rank)"
    return (f"non-finite weights at step {step} while every loss term was finite: a non-finite gradient in steps "
            f"{start + 1}-{step}")


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
    except KeyboardInterrupt:  # a second Ctrl-C during set-up, or one during the final evaluation
        parser.exit(130, f"\n{parser.prog}: interrupted; checkpoints written so far are whole, and the same "
                         f"command resumes from the last one\n")
