"""The flags of the three training scripts, their recipes (engine.recipes) and the original code's flag names.

`build_parser(description, script)` makes the parser of train.py, train_rs.py or train_rs_aug.py; `parse(parser,
argv)` parses, fills every flag the command line left out from the chosen recipe, and warns once about the
original's flags that it parsed but never read.
"""
from __future__ import annotations

import argparse
import math
import sys

from models.encoder import ENCODER_ARCHS
from models.scanner import ARCHS

from .recipes import RECIPES, UNREAD_FLAGS, describe, settings

SCRIPTS = ("train", "train_rs", "train_rs_aug")

#: Flags that may change between a run and its resumption without a warning.
RESUMABLE_FLAGS = {"max_step", "max_epoch", "device", "log_every", "val_every", "save_every", "workers", "val_images",
                   "eval_size", "test_images", "results_dir", "channels_last", "compile"}


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


def optional_positive_int(text: str) -> int | None:
    """A positive integer, or 'none' for no limit."""
    return None if text.strip().lower() == "none" else positive_int(text)


def optional_int(text: str) -> int | None:
    return None if text.strip().lower() == "none" else int(text)


def on_off(text: str) -> bool:
    """'on'/'off' (also true/false, yes/no, 1/0): the original's `type=bool` flags took a value."""
    value = text.strip().lower()
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"must be on or off (true/false, 1/0), got {text}")


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
    """Show defaults, and keep the script docstring's line breaks (its example commands). A flag whose help already
    says what its default is, or whose default is None (decided later), gets no "(default: ...)" appended."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class RecipeGroup:
    """An argument group whose flags default to the recipe: left out of the namespace unless given (SUPPRESS),
    with both recipes' values in their help."""

    def __init__(self, parser, group, script):
        self.parser, self.group, self.script = parser, group, script

    def add(self, *flags, help, **kwargs):
        action = self.group.add_argument(*flags, default=argparse.SUPPRESS, help=help + describe(
            kwargs.get("dest") or flags[0].lstrip("-"), self.script).replace("%", "%%"), **kwargs)
        self.parser.recipe_dests.add(action.dest)
        return action


def build_parser(description: str, script: str) -> argparse.ArgumentParser:
    """The parser of a training script ('train', 'train_rs' or 'train_rs_aug'); parse with `parse`."""
    if script not in SCRIPTS:
        raise ValueError(f"unknown training script {script!r}; choose one of {SCRIPTS}")
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    p.script, p.recipe_dests = script, set()
    p.add_argument("--recipe", choices=sorted(RECIPES), default="original",
                   help="every setting not given on the command line comes from this recipe: 'original' is the "
                        "original code's training (the paper's experiment: 400x400 MIRFlickr, its encoder and "
                        "detector, batch 64), 'robust' ours for small crops on CPU, 'robust_v1' the robust recipe "
                        "as the demo and the five shipped models were trained (no perceptual shaping, no "
                        "resampling stage, nine corruptions). Each flag's help shows every recipe's value; see "
                        "docs/fidelity.md")
    run = p.add_argument_group("run")
    r = RecipeGroup(p, run, script)
    run.add_argument("--run_name", required=True,
                     help="name of the run: everything goes under RESULTS_DIR/RUN_NAME/; the same name again "
                          "resumes from its checkpoints/last.pt")
    run.add_argument("--results_dir", default="results", help="parent folder of all runs")
    r.add("--max_step", type=positive_int,
          help="total optimisation steps (the paper: 200,000); a larger value continues a finished run")
    r.add("--max_epoch", type=optional_positive_int,
          help="stop after this many passes over the training split if that comes before --max_step ('none': "
               "no limit)")
    run.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    r.add("--amp", choices=("on", "off"),
          help="mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling); never on CPU")
    run.add_argument("--seed", type=int, default=0, help="seed for initialisation, crops and noise")
    run.add_argument("--workers", type=non_negative_int, default=None,
                     help="DataLoader worker processes per training process (default on CUDA: the process's share "
                          "of the cores, at most 8, with pinned memory; 0 on CPU, where cores are better spent on "
                          "the model)")
    run.add_argument("--speed_warmup", type=non_negative_int, default=10, metavar="STEPS",
                     help="steps left out of summary.json's train_images_per_second_after_warmup (cuDNN "
                          "autotuning, the loader's first batches); the device is synchronised once, after them")
    run.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                     help="channels_last (NHWC) memory format for the networks and their inputs (default: on, "
                          "except with --compile; --no-channels_last for the plain NCHW layout)")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the encoder and the scanner (the first steps take minutes to compile; "
                          "needs a C++ compiler on CPU)")

    data = p.add_argument_group("data")
    d = RecipeGroup(p, data, script)
    d.add("--train_path", nargs="+", metavar="FOLDER",
          help="one or more folders of training images, searched recursively (jpg, jpeg, png, bmp, webp, tif), "
               "pooled into one set; or 'bundled' for the photos scikit-image ships (the robust default; a folder "
               "named 'bundled' wins); split 90/10 train/test, then 2%% of train for validation")
    data.add_argument("--split_seed", type=int, default=0,
                      help="seed of the train/val/test split; keep it fixed across runs you compare")
    d.add("--image_size", type=positive_int, help="side in pixels of the square training images (the paper: 400)")
    d.add("--train_crop", choices=("random", "fit"),
          help="training images: 'random' square crops at native resolution, or each whole photo 'fit' to "
               "image_size x image_size (centre crop to a square, then resize: the original's ImageOps.fit)")
    data.add_argument("--max_crop_scale", type=positive_float, default=1.0,
                      help="scale jitter of --train_crop random: each crop covers 1 to this many times "
                           "--image_size pixels per side of the photo, resized to --image_size (1 = native only)")
    data.add_argument("--photo_shift", type=non_negative_float, default=0.0,
                      help="shift each colour channel of every training photo by a random amount up to ± this "
                           "(kornia's RandomRGBShift, per photo) before it is stamped, so that a colour cast tells "
                           "the scanner nothing: on mostly grey photos (the demo's) the encoder otherwise settles "
                           "on a faint cast as its stamp, which colourful photos hide (0 = off, as the original)")
    data.add_argument("--grid_shift", type=non_negative_int, default=0,
                      help="crop each image of the pair the scanner sees (clean and stamped, after stamping) at "
                           "its own random offset of 0 to this many rows and columns (moved, not resampled), so "
                           "that the scanner cannot read the stamp at one phase of the pixel grid only; without it "
                           "a stamp can be lost when a crop moves the grid by one row (docs/models.md). 0 = off, "
                           "as the original")
    d.add("--batch_size", type=positive_int,
          help="images per step; the scanner sees 2x this (clean and stamped) per view")

    model = p.add_argument_group("model")
    m = RecipeGroup(p, model, script)
    m.add("--encoder", choices=ENCODER_ARCHS,
          help="stamp encoder: 'stegastamp' (the original's, with its image embedder and dense branch; 400x400 "
               "only) or 'unet' (fully convolutional, any size)")
    m.add("--scanner", choices=sorted(ARCHS),
          help="scanner: deepraft (the small detector the original code trains; 400x400 only), resnet18 (the "
               "ResNet the paper describes), narrow (ResNet-18 at 16-32-64-128) or fast (7 unpadded convs, about "
               "4x narrow: 300-450 img/s at 400x400 on 2 CPU cores; needs --image_size >= 108 or it sees padding)")
    m.add("--padding_mode", choices=("zeros", "replicate"),
          help="padding of both networks' convolutions: zero padding lets them find the image border, where an "
               "encoder trained on small crops hides the stamp in a stripe; replicate keeps them blind to it")
    m.add("--max_residual", type=non_negative_float,
          help="bound on the residual per pixel, in [0,1] units (δ = max_residual·tanh(u/max_residual)); "
               "0 = unbounded")
    m.add("--clamp_stamp", type=on_off,
          help="on: the losses and the scanner see the stamped image clamped to [0,1], as a saved image is; off: "
               "x + δ unclamped (the augmented view is clamped either way)")
    model.add_argument("--init_from", default=None, metavar="MODEL_OR_RUN",
                       help="fine-tune: start from these weights (a model folder with config.json, or a run folder "
                            "holding model/) with a fresh optimiser at step 0; the architecture is the model's")
    m.add("--bn_freeze_step", type=optional_int,
          help="from this step on, the scanner's BatchNorm layers use and keep their running statistics, so it "
               "trains as it is judged: one image at a time. 'none': when the image-loss ramp ends (warmup_steps "
               "+ ramp_steps); a negative value never freezes")
    model.add_argument("--encoder_width", type=positive_float, default=1.0,
                       help="channel multiplier of the unet encoder (1.0 = StegaStamp's 32-32-64-128-256)")
    # perceptual shaping (models.jnd, docs/method.md)
    m.add("--jnd", type=non_negative_float, metavar="STRENGTH",
          help="perceptual shaping of the residual: multiply it per pixel by the photo's just-noticeable-difference "
               "map to the power STRENGTH (the map: 1 in texture, near edges and in deep shadow, 0.25 on flat "
               "mid-grey; the bound becomes max_residual times it); 0 = off. Stored in the encoder's config, so "
               "stamp.py and evaluate.py shape as training did; with --init_from it replaces the model's")

    opt = p.add_argument_group("optimisation and loss weights")
    o = RecipeGroup(p, opt, script)
    o.add("--lr", type=positive_float, help="Adam learning rate at step 0 (one parameter group per network)")
    o.add("--lr_decay", type=positive_float,
          help="exponential decay: the learning rate is multiplied by this every --lr_decay_steps units")
    o.add("--lr_decay_steps", type=positive_int, help="units (--lr_decay_unit) per --lr_decay factor")
    o.add("--lr_decay_unit", choices=("step", "epoch"),
          help="the learning rate decays smoothly every step, or once per epoch (one pass over the training split)")
    o.add("--img_w", type=non_negative_float,
          help="weight of L_rr, the residual regularisation (YUV-weighted MSE + l1_w·mean|u|)")
    o.add("--l1_w", type=non_negative_float,
          help="weight of mean|u| inside L_rr, u the residual before its tanh bound (δ itself with --max_residual 0)")
    o.add("--y_scale", type=non_negative_float, help="weight of the luma (Y) MSE in L_rr")
    o.add("--u_scale", type=non_negative_float, help="weight of the chroma U MSE in L_rr")
    o.add("--v_scale", type=non_negative_float, help="weight of the chroma V MSE in L_rr")
    o.add("--lps_w", type=non_negative_float,
          help="weight of L_ps, LPIPS(AlexNet); 0 skips loading it. Off, with one line saying so, when "
               "torchvision cannot load the AlexNet weights")
    o.add("--flat_w", type=non_negative_float,
          help="weight of L_flat relative to img_w: the YUV-weighted MSE of L_rr with each pixel weighed by the "
               "inverse square of the photo's just-noticeable-difference map, normalised to mean 1 per photo (a flat "
               "mid-grey pixel counts up to 16 times a textured one); it joins img_w·(L_rr + flat_w·L_flat) under "
               "the image-loss ramp; 0 = off")
    o.add("--rs_w", "--acc_w", dest="rs_w", type=non_negative_float,
          help="weight of the scanner's cross-entropy on the plain or noisy pair [x, x'] in L_A (--acc_w: the "
               "same flag)")
    # the original's names, where the original script reads them (train_rs_aug.py parses them and never reads them)
    originals = () if "img_start" in UNREAD_FLAGS[script] else ("--img_start",)
    o.add("--warmup_steps", *originals, dest="warmup_steps", type=non_negative_int,
          help="steps with the image losses off before their ramp (--img_start: the original's name). Beware: "
               "with no image loss the encoder can settle on a saturated colour cast that tanh never lets go of "
               "(seen at 300 steps on CPU)")
    o.add("--ramp_steps", type=non_negative_int,
          help="steps over which the image-loss weight rises linearly from 0 to 1 after --warmup_steps, so the "
               "scanner finds the stamp before L_rr and L_ps shrink it (0 = full from the start)")
    if originals:
        opt.add_argument("--img_end", type=non_negative_int, default=None,
                         help="the original's name for the end of the image-loss ramp: sets --ramp_steps to "
                              "img_end - img_start")
    o.add("--ramp_scaled_by_img_w", type=on_off,
          help="the image-loss ramp rises img_w times faster, min(img_w·(step-start)/(end-start), 1), as in the "
               "original")

    log = p.add_argument_group("logging and checkpoints")
    lg = RecipeGroup(p, log, script)
    lg.add("--log_every", type=positive_int, help="steps between TensorBoard scalars")
    lg.add("--val_every", "--log_interval", dest="val_every", type=positive_int,
           help="steps between validations (accuracy, PSNR, SSIM, images in TensorBoard; --log_interval: the "
                "original's name)")
    lg.add("--save_every", "--save_interval", dest="save_every", type=positive_int,
           help="steps between checkpoints (--save_interval: the original's name)")
    log.add_argument("--eval_size", type=positive_int, default=None,
                     help="side of the held-out validation and test images, in pixels (default: --image_size); "
                          "the fully convolutional networks take any size")
    log.add_argument("--val_images", type=positive_int, default=128, help="validation images per validation")
    log.add_argument("--test_images", type=positive_int, default=256,
                     help="held-out test images for the end-of-run summary")

    unread = p.add_argument_group(
        "flags of the original code that it parsed but never read: accepted, so that old command lines run, "
        "and ignored with a warning")
    for name in UNREAD_FLAGS[script]:
        unread.add_argument(f"--{name}", dest=f"unread_{name}", nargs="?", const=True, default=argparse.SUPPRESS,
                            metavar="VALUE")
    return p


def add_aug_flags(parser: argparse.ArgumentParser, group) -> None:
    """The augmentation flags of train.py (with its --aug switch) and train_rs_aug.py."""
    from augment import CORRUPTIONS, OPT_IN

    g = RecipeGroup(parser, group, parser.script)
    if parser.script == "train":
        g.add("--aug", type=on_off, nargs="?", const=True,
              help="also train the scanner on the corrupted pair (Table 1's Plain+DA): CE(plain) + CE(chain(x), "
                   "chain(x')), the chain applied to the clean and the stamped batch separately; the original "
                   "chain has crop scale (0.4, 1), jitter 0.4, perspective 0.4 and one JPEG quality for the run. "
                   "'--aug', '--aug on' or '--aug True'")
    g.add("--aug_chain", choices=("original", "stochastic"),
          help="'original': the original code's fixed chain (jitter, crop, blur, rotate, perspective, JPEG, each "
               "with probability aug_prb, parameters drawn once per batch, its ranges); 'stochastic': a random "
               "subset of --augs in random order with per-sample parameters (the training preset's ranges)")
    g.add("--aug_prb", "--aug_prob", dest="aug_prb", type=probability,
          help="probability that the chain applies each corruption (per batch for 'original', per image for "
               "'stochastic'; --aug_prob: the same flag)")
    g.add("--augs",
          help=f"the stochastic chain's corruptions, comma-separated, or 'all' (every one but "
               f"{', '.join(OPT_IN)}, which reads each batch back to the host): {', '.join(CORRUPTIONS)}")
    group.add_argument("--aug_downscale", type=probability, default=1.0, metavar="SMALLEST",
                       help="before the chain, shrink the augmented pair (each side × one factor per batch, drawn "
                            "uniformly from 8 evenly spaced values from SMALLEST to 1, so that the scanner sees at "
                            "most 8 input shapes and cuDNN autotunes only those; antialiased) and do not scale it "
                            "back, so that the scanner learns the stamp of a photo a platform downscaled before "
                            "recompressing it; 1 = off, as the original")
    # resampling as platforms and the product do it (augment.resample, docs/augmentation.md)
    g.add("--aug_resample", type=on_off,
          help="before the chain (after --aug_downscale), send the augmented pair where a photo goes, one draw per "
               "batch: stamp.py's round trip for a photo of 2x or 4x the working size (the residual upsampled to "
               "it), a platform's resampling of each side by 0.4 to 2 (area, bilinear, bicubic or Lanczos, as "
               "Pillow's), 8-bit files, then scan.py's step down to the working size; the scanner reads it at "
               "that size (at most 10 shapes: a grid)")


def parse(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse `argv`; every recipe flag not given takes the recipe's value; warn once about unread original flags.

    The namespace gains `recipe_overrides`: the recipe flags given explicitly (args.json records both).
    """
    args = parser.parse_args(argv)
    given = sorted(dest for dest in parser.recipe_dests if hasattr(args, dest))
    for dest, value in settings(args.recipe, parser.script).items():
        if dest in parser.recipe_dests and not hasattr(args, dest):
            setattr(args, dest, value)
    if getattr(args, "img_end", None) is not None:
        if args.img_end < args.warmup_steps:
            parser.error(f"--img_end ({args.img_end}) must not be before --img_start ({args.warmup_steps})")
        args.ramp_steps = args.img_end - args.warmup_steps
    if getattr(args, "aug_end", 0) < getattr(args, "aug_start", 0):
        parser.error(f"--aug_end ({args.aug_end}) must not be before --aug_start ({args.aug_start})")
    ignored = sorted(k for k in vars(args) if k.startswith("unread_"))
    if ignored:
        print(f"warning: ignoring {', '.join('--' + k[len('unread_'):] for k in ignored)}: the original "
              f"{parser.script}.py parsed but never read {'it' if len(ignored) == 1 else 'them'}", file=sys.stderr)
        for k in ignored:
            delattr(args, k)
    args.recipe_overrides = given
    args.script = parser.script  # which of the paper's models this trains (report.paper.model_kind)
    return args
