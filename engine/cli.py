"""The flags every training script shares. Scripts add their own (e.g. --std) before parsing."""
from __future__ import annotations

import argparse
import math

from models.scanner import ARCHS

#: Flags that may change between a run and its resumption without a warning.
RESUMABLE_FLAGS = {"max_step", "device", "log_every", "val_every", "save_every", "workers", "val_images", "eval_size",
                   "test_images", "results_dir", "channels_last", "compile"}


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a probability in (0, 1], got {text}")
    return value


def significance(text: str) -> float:
    """A significance level or failure probability, strictly between 0 and 1 (e.g. smoothing's --alpha)."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults, and keep the script docstring's line breaks (its example commands)."""


def build_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    run = p.add_argument_group("run")
    run.add_argument("--run_name", required=True,
                     help="name of the run: everything goes under RESULTS_DIR/RUN_NAME/; the same name again "
                          "resumes from its checkpoints/last.pt")
    run.add_argument("--results_dir", default="results", help="parent folder of all runs")
    run.add_argument("--max_step", type=positive_int, default=200_000,
                     help="total optimisation steps (the paper: 200,000); a larger value continues a finished run")
    run.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    run.add_argument("--seed", type=int, default=0, help="seed for initialisation, crops and noise")
    run.add_argument("--workers", type=non_negative_int, default=None,
                     help="DataLoader worker processes per training process (default: 4 on CUDA, with pinned "
                          "memory; 0 on CPU where cores are better spent on the model)")
    run.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                     help="channels_last (NHWC) memory format for the networks and their inputs (default: on, "
                          "except with --compile; --no-channels_last for the plain NCHW layout)")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the encoder and the scanner (the first steps take minutes to compile; "
                          "needs a C++ compiler on CPU)")

    data = p.add_argument_group("data")
    data.add_argument("--train_path", default=None,
                      help="folder of training images, searched recursively (jpg, jpeg, png, bmp, webp, tif); "
                           "split 90/10 train/test, then 2%% of train for validation. Default: the photos "
                           "scikit-image ships")
    data.add_argument("--split_seed", type=int, default=0,
                      help="seed of the train/val/test split; keep it fixed across runs you compare")
    data.add_argument("--image_size", type=positive_int, default=400,
                      help="side in pixels of the square random training crops (the paper: 400)")
    data.add_argument("--max_crop_scale", type=positive_float, default=1.0,
                      help="scale jitter: each training crop covers 1 to this many times --image_size pixels "
                           "per side of the photo, resized to --image_size (1 = native resolution only)")
    data.add_argument("--batch_size", type=positive_int, default=16,
                      help="images per step; the scanner sees 2x this (clean and stamped) per view")

    model = p.add_argument_group("model")
    model.add_argument("--scanner", choices=sorted(ARCHS), default="resnet18",
                       help="scanner architecture: resnet18 (the paper's), narrow (ResNet-18 at 16-32-64-128) or fast "
                            "(7 unpadded convs, about 4x narrow: 300-450 img/s at 400x400 on 2 CPU cores; needs --image_size >= 108 "
                            "or it sees padding)")
    model.add_argument("--init_from", default=None, metavar="MODEL_OR_RUN",
                       help="fine-tune: start from these weights (a model folder with config.json, or a run folder "
                            "holding model/) with a fresh optimiser at step 0; the architecture is the model's")
    model.add_argument("--bn_freeze_step", type=int, default=None,
                       help="from this step on, the scanner's BatchNorm layers use and keep their running "
                            "statistics, so it trains as it is judged: one image at a time. Default: when the "
                            "image-loss ramp ends (warmup_steps + ramp_steps); a negative value never freezes")
    model.add_argument("--encoder_width", type=positive_float, default=1.0,
                       help="channel multiplier of the U-Net encoder (1.0 = StegaStamp's 32-32-64-128-256)")
    model.add_argument("--max_residual", type=positive_float, default=0.05,
                       help="bound on the residual per pixel, in [0,1] units (δ = max_residual·tanh)")

    opt = p.add_argument_group("optimisation and loss weights")
    opt.add_argument("--lr", type=positive_float, default=1e-4, help="Adam learning rate at step 0")
    opt.add_argument("--lr_decay", type=positive_float, default=0.5,
                     help="exponential decay: the learning rate is multiplied by this every --lr_decay_steps")
    opt.add_argument("--lr_decay_steps", type=positive_int, default=100_000, help="steps per --lr_decay factor")
    opt.add_argument("--img_w", type=non_negative_float, default=1.0,
                     help="weight of L_rr, the residual regularisation (YUV-weighted MSE + l1_w·mean|δ|)")
    opt.add_argument("--l1_w", type=non_negative_float, default=0.1, help="weight of mean|δ| inside L_rr")
    opt.add_argument("--lps_w", type=non_negative_float, default=1.0,
                     help="weight of L_ps, LPIPS(AlexNet); 0 skips loading it. Off, with one line saying so, "
                          "when torchvision cannot load the AlexNet weights")
    opt.add_argument("--acc_w", type=non_negative_float, default=1.0,
                     help="weight of L_A, the scanner's cross-entropy on [x, x'] (the paper's rs_w in train_rs*)")
    opt.add_argument("--warmup_steps", type=non_negative_int, default=0,
                     help="steps with the image losses off before the ramp. Beware: with no image loss the "
                          "encoder can settle on a saturated colour cast that tanh never lets go of (seen at "
                          "300 steps on CPU); the linear ramp alone was what worked")
    opt.add_argument("--ramp_steps", type=non_negative_int, default=10_000,
                     help="steps over which the image-loss weights (img_w, lps_w) rise linearly from 0 to full, "
                          "so the scanner finds the stamp before L_rr and L_ps shrink it")

    log = p.add_argument_group("logging and checkpoints")
    log.add_argument("--log_every", type=positive_int, default=50, help="steps between TensorBoard scalars")
    log.add_argument("--val_every", type=positive_int, default=1_000,
                     help="steps between validations (accuracy, PSNR, SSIM, images in TensorBoard)")
    log.add_argument("--save_every", type=positive_int, default=1_000, help="steps between checkpoints")
    log.add_argument("--eval_size", type=positive_int, default=None,
                     help="side of the held-out validation and test crops, in pixels (default: --image_size); "
                          "the networks are fully convolutional, so any size works")
    log.add_argument("--val_images", type=positive_int, default=128, help="validation crops per validation")
    log.add_argument("--test_images", type=positive_int, default=256,
                     help="held-out test crops for the end-of-run summary")
    return p
