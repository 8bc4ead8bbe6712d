"""Turn a trained model into the paper's evidence: detection accuracy under corruptions (Table 1) and after
what a messaging app does to a photo (Table 1b, forwarding: real JPEG/WebP, downscaling, cropping),
imperceptibility (Table 2), adversarial robustness (Table 3), certified accuracy for smoothed scanners, and
calibrated detection (ROC-AUC, thresholds for a stated false-block rate).

    python evaluate.py --checkpoint results/demo --quick                  # ≤ 2 minutes on one CPU thread
    python evaluate.py --checkpoint results/rs_aug --data_path PATH/mirflickr_test   # the paper's settings

Everything goes to results/<run>/eval/ (eval/quick/ with --quick): results.json (all numbers, settings,
seed, commit), tables.md, CSVs, plots, and TensorBoard events (eval/tb).

A network that takes one input size only (the original code's, arch 'stegastamp' or 'deepraft': 400×400) is
evaluated on each photo fitted to that size (centre square, resized, like the original's ImageOps.fit) instead
of tiles of --size. A model folder that holds a scanner only (e.g. `python -m models.convert_original`) has no
encoder to stamp with: only its clean photos are judged (accuracy and false-positive rate, per photo, under
each condition of Table 1); everything about stamped photos is left out, and results say so.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from datasets import ImageFolderDataset, UnreadableImageWarning, resolve_image_paths, split_files
from engine.cli import HelpFormatter, non_negative_int, positive_float, positive_int, significance
from engine.device import pick_device, seed_everything
from engine.losses import load_lpips
from engine.rundir import git_commit
from models import CLEAN, STAMPED, load_pretrained
from models.io import CALIBRATION_NAME
from report.attacks import AttackSettings, robustness_table
from report.calibration import TARGET_FPRS, operating_point, roc_curve
from report.conditions import forwarding_conditions, table1_conditions
from report.detection import accuracy_row, by_photo, detection_pass, mean_std, photo_means
from report.compare import compare
from report.judge import Judge
from report import paper as paper_tables
from report.original_protocol import original_attack_table, original_image_quality
from report.paper import KINDS as PAPER_KINDS
from report.paper import model_kind, setting_differences
from report.plots import write_plots
from report.tables import render_markdown, write_csvs
from smoothing import Smooth
from product.pipelines import PIPELINES, QUICK_PIPELINES, SHORT_PIPELINES
from product.scanning import PhotoScanner, ScanSettings, draw_seed
from product.stage import ProductStage, StageSettings, calibration_record, product_summary
from product.stage import render as render_product
from product.stamping import DEFAULT_WORKING_SIZE, fit_pixels, to_working
from smoothing.certify import RADII, certified_accuracy, certify_labelled, resolve_model, write_tsv

#: --quick: a smoke check of every stage, its figures labelled quick (settings.quick), in at most 2 minutes on one
#: CPU thread whatever the model (measured at the worst: the robust recipe's ResNet-18, every verdict drawing all its
#: copies, every attack running its full course). 4 tiles of 64 px; ≤ 16 noisy copies per verdict (one look, so votes
#: near ½ cost no more); 1 photo (clean and stamped) attacked and 2 certified; 2 budgets; few attack iterations,
#: queries, EOT draws, PGD steps and noisy passes: at most about 5,000 scanner passes without a gradient and 150 with
#: one (tests/test_evaluate.py counts them). A network fixed to 400×400 is judged at that size instead of `size`.
#: A flag given overrides its entry.
QUICK = dict(max_images=4, size=64, predict_n=16, certify_n=100, n0=16, certify_images=2, attack_images=1,
             eps="8,32", original_eps="8,32", apgd_iters=5, square_queries=20, eot_iter=2, passes=16, pgd_steps=5)
#: the paper's settings (n = 100,000 for certification); PREDICT uses 1,000 samples per photo and condition
FULL = dict(max_images=None, size=400, predict_n=1000, certify_n=100_000, n0=100, certify_images=100,
            attack_images=100, passes=1000, eps="2,4,8,16,32", original_eps="2,4,8,16,32,64", pgd_steps=40)
#: what results and the summary say about a scanner-only model folder
SCANNER_ONLY_NOTE = ("this model folder holds a scanner only (converted from the original code): with no encoder "
                     "there are no stamped photos, so only the clean photos were judged (accuracy and false-positive "
                     "rate, per photo, under each condition); the stamped rows (stamped and overall accuracy, "
                     "ROC-AUC), imperceptibility, attacks, calibration and certification need an encoder")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="a run folder (results/NAME, with model/) or a model folder (with config.json), e.g. "
                        "pretrained_models/rs_aug (required unless --compare)")
    p.add_argument("--protocol", choices=("strict", "original", "both"), default="both",
                   help="strict: ours (Cohen's PREDICT with abstention, EOT attacks, certification, statistics by "
                        "photo); original: the original code's (a smoothed scanner scored by the mean accuracy of "
                        "--passes single noisy passes, attacks crafted on the base scanner without noise, ε up to "
                        "64/255, FGSM, PGD-40 and random noise, Table 2 per batch of the unclamped stamp), the way "
                        "the paper's numbers were made; both: the two side by side (see docs/evaluation.md)")
    p.add_argument("--paper_row", choices=("auto", *PAPER_KINDS), default="auto",
                   help="which of the paper's models this is, for the paper column: plain (train.py), plain_da "
                        "(train.py --aug), rs (train_rs.py), da_rs (train_rs_aug.py); auto reads the run's args.json, "
                        "or a model folder's config.json and name")
    p.add_argument("--compare", nargs="+", metavar="RUN_OR_MODEL", default=None,
                   help="instead of evaluating: assemble the results.json of these evaluated runs or model folders "
                        "(or their eval folders) into the paper's three tables, written to --out (a .md file; "
                        "default results/compare.md) with a .json beside it")
    p.add_argument("--data_path", default=None,
                   help="folder of photos, searched recursively (default: the photos scikit-image ships). When "
                        "it is the data the run trained on, only the run's held-out test split is used")
    p.add_argument("--all_images", action="store_true",
                   help="use every photo in --data_path even if the run trained on it")
    p.add_argument("--size", type=non_negative_int, default=None,
                   help=f"side of the square tiles taken from each photo (default {FULL['size']}, the paper's; "
                        f"{QUICK['size']} with --quick); 0 = each photo at its native resolution, one at a time")
    p.add_argument("--working_size", type=non_negative_int, default=None,
                   help="instead of tiles: each photo whole, brought to scan.py's working resolution (long side N, "
                        "antialiased, as stamp.py and scan.py do; 512 is their default), one at a time: what to "
                        "calibrate scan.py with (--write_calibration records it, and scan.py checks it)")
    p.add_argument("--max_images", type=positive_int, default=None,
                   help="tiles (or photos) to evaluate; several tiles per photo when there are fewer photos "
                        f"(default: all; {QUICK['max_images']} with --quick)")
    p.add_argument("--batch_size", type=positive_int, default=16, help="photos stamped and scanned at once")
    p.add_argument("--quick", action="store_true",
                   help="a smoke check of every stage, at most 2 minutes on one CPU thread: few small tiles, few "
                        "noisy copies, attack iterations and budgets (evaluate.QUICK, recorded in results.json); "
                        "results go to eval/quick/")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: RUN/eval, or results/<model folder name>/eval; /quick appended "
                        "with --quick)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing results.json in --out (and MODEL/calibration.json)")
    p.add_argument("--write_calibration", action="store_true",
                   help="also write MODEL/calibration.json, which scan.py then judges by: the product stage "
                        "(turned on by this flag) chooses the rule's threshold (a smoothed scanner: its margin) on "
                        "the photos as stamped for FPR ≤ 1%%, and verifies it under scan.py's own rule")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of corruptions, noise and attacks, for a repeatable run (default: drawn from the "
                        "operating system and recorded in results.json)")
    p.add_argument("--forwarding", choices=("on", "off"), default="on",
                   help="on: also Table 1b, forwarding: detection after what a messaging app does to a photo, real "
                        "codecs on the photo saved as 8-bit pixels (JPEG quality 60 and 75 with 4:2:0 chroma, WebP "
                        "quality 75, downscaling each side to 75%% (Lanczos) then JPEG quality 80, the centre 90%% "
                        "of each side then JPEG quality 85), clean and stamped photos alike, judged at the size "
                        "they arrive at (fitted again for a fixed-size network) and scored as Table 1 is under "
                        "each protocol; in --quick too. off: skip it")

    pr = p.add_argument_group("the product stage: stamp.py → platform pipelines → scan.py (product.stage)")
    pr.add_argument("--product", choices=("off", "on", "only"), default="off",
                    help="on: also the product stage: photos stamped as stamp.py stamps, saved as 8-bit files, sent "
                         "through each platform pipeline (product.pipelines: JPEG, WebP, resizing, crops, "
                         "screenshots), clean and stamped alike, and judged as scan.py judges at its defaults (the "
                         "model's calibration); only: that stage alone (product.md, results.json, visibility.png); "
                         "--write_calibration turns it on")
    pr.add_argument("--product_sizes", default="1,0.5,2,4",
                    help="photo sizes, as factors on each side (Lanczos): 1 = the photos as they are, 0.5 = small web "
                         "images, 2 and 4 = larger than stamp.py's working size (--quick: 1)")
    pr.add_argument("--product_pipelines", choices=("all", "short"), default="all",
                    help="all: every pipeline of product.pipelines (14); short: 6, one of each kind "
                         "(product.pipelines.SHORT_PIPELINES; --quick: 3)")
    pr.add_argument("--product_photos", type=positive_int, default=50,
                    help="how many photos (the first ones) are rescaled to each size other than 1")
    pr.add_argument("--calibration_copies", type=positive_int, default=16,
                    help="noisy copies whose median logit margin is a smoothed scanner's calibration score of a "
                         "photo after a pipeline")

    s = p.add_argument_group("smoothing (for scanners trained with train_rs*.py)")
    s.add_argument("--judge", choices=["auto", "plain", "smoothed"], default="auto",
                   help="how verdicts are made: the plain scanner's argmax, or Smooth.predict; auto = smoothed "
                        "when the run was trained with --std")
    s.add_argument("--sigma", type=positive_float, default=None, help="smoothing σ (default: the run's --std)")
    s.add_argument("--predict_n", type=positive_int, default=None,
                   help=f"noise samples per PREDICT (default {FULL['predict_n']}; {QUICK['predict_n']} quick)")
    s.add_argument("--alpha", type=significance, default=0.001, help="PREDICT's and CERTIFY's failure rate")
    s.add_argument("--certify_n", type=positive_int, default=None,
                   help=f"CERTIFY's estimation samples (default {FULL['certify_n']:,}, the paper's; "
                        f"{QUICK['certify_n']} quick)")
    s.add_argument("--n0", type=positive_int, default=None,
                   help=f"CERTIFY's selection samples (default {FULL['n0']}; {QUICK['n0']} quick)")
    s.add_argument("--certify_images", type=non_negative_int, default=None,
                   help=f"photos certified, each clean and stamped (default {FULL['certify_images']}; "
                        f"{QUICK['certify_images']} quick; 0 skips certification)")
    s.add_argument("--noise_batch", type=positive_int, default=200, help="noisy copies classified at once")
    s.add_argument("--sequential", choices=("on", "off"), default="on",
                   help="on: sequential PREDICT, which stops at the first decisive look (16, 64, 256, … copies, up "
                        "to --predict_n) with the same bound alpha on a wrong verdict, and judges the photos of a "
                        "batch in shared forward passes; off: Cohen's fixed-n PREDICT")

    a = p.add_argument_group("adversarial attacks (Table 3)")
    a.add_argument("--attack_images", type=non_negative_int, default=None,
                   help=f"photos attacked, each clean and stamped (default {FULL['attack_images']}; "
                        f"{QUICK['attack_images']} quick; 0 skips Table 3, not certification: "
                        "--certify_images 0 skips that)")
    a.add_argument("--eps", default=None,
                   help=f"L∞ budgets in /255 units, comma-separated (default {FULL['eps']}; {QUICK['eps']} quick)")
    a.add_argument("--apgd_iters", type=positive_int, default=None,
                   help=f"APGD-CE iterations (default: the paper's 100; {QUICK['apgd_iters']} with --quick)")
    a.add_argument("--square_queries", type=positive_int, default=None,
                   help=f"Square queries (default: the paper's 5,000; {QUICK['square_queries']} with --quick)")
    a.add_argument("--eot_iter", type=positive_int, default=None,
                   help=f"noise draws per APGD gradient in the adaptive attack on smoothed scanners (default 20; "
                        f"{QUICK['eot_iter']} with --quick)")
    o = p.add_argument_group("the original protocol")
    o.add_argument("--passes", type=positive_int, default=None,
                   help=f"noisy single passes averaged to score a smoothed scanner's adversarial images (default "
                        f"{FULL['passes']}, the original's; {QUICK['passes']} quick). Table 1's original column "
                        f"averages the --predict_n passes of the detection pass")
    o.add_argument("--pgd_steps", type=positive_int, default=None,
                   help=f"steps of its PGD row, 'pgd-40' (default {FULL['pgd_steps']}, the original's; "
                        f"{QUICK['pgd_steps']} quick)")
    o.add_argument("--original_eps", default=None,
                   help=f"the original protocol's L∞ budgets in /255 units (default {FULL['original_eps']}, its "
                        f"code's list; {QUICK['original_eps']} with --quick)")
    return p


def _factor_list(text: str) -> tuple[float, ...]:
    """--product_sizes: comma-separated positive factors → a tuple (ValueError naming the flag when bad)."""
    try:
        factors = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        factors = ()
    if not factors or any(not (math.isfinite(f) and f > 0) for f in factors):
        raise ValueError(f"--product_sizes {text!r}: give positive factors separated by commas, e.g. 1,0.5,2,4")
    return factors


def _eps_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) / 255 for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--eps {text!r}: give numbers in /255 units, e.g. 2,4,8,16,32") from None
    if not values or any(not (0 <= v <= 1) for v in values):
        raise ValueError(f"--eps {text!r}: give budgets between 0 and 255 (in /255 units)")
    return values


def _same_data(a, b) -> bool:
    """Is --data_path a (one folder or None) the run's --train_path b (a folder, a list of them, or None)?"""
    if isinstance(b, (list, tuple)):
        if len(b) != 1:
            return False
        b = b[0]
    if a is None or b is None:
        return a is None and b is None
    return Path(a).resolve() == Path(b).resolve()


class Evaluation:
    """The stages of one evaluation; run() drives them and returns the results dict."""

    STAGES = ["load", "detection and imperceptibility", "calibration", "product", "adversarial attacks",
              "certification", "original protocol", "write"]
    #: the stages after detection that can take long: detection's figures are printed before them
    LONG_STAGES = ("product", "adversarial attacks", "certification", "original protocol")

    def __init__(self, args, log=print):
        self.args, self.log = args, log
        # recorded in results.json: --seed repeats the run; 31 bits, as numpy's and the attack libraries' seeds take
        args.seed = draw_seed(args.seed, bits=31)
        if args.write_calibration and args.product == "off":
            args.product = "on"  # the calibration is made, and verified, by the product stage
        self.product_sizes = _factor_list(args.product_sizes) if not args.quick else (1.0,)
        defaults = QUICK if args.quick else FULL
        for key, value in defaults.items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)
        self.eps = _eps_list(args.eps)
        self.original_eps = _eps_list(args.original_eps)
        self.strict, self.original = args.protocol in ("strict", "both"), args.protocol in ("original", "both")
        if args.checkpoint is None:
            raise ValueError("--checkpoint: required (a run folder or a model folder), unless --compare")
        self.model_dir, self.run_dir, self.run_args = resolve_model(args.checkpoint)
        base = self.run_dir if self.run_dir is not None else Path("results") / self.model_dir.name
        self.out = args.out or (base / "eval" / ("quick" if args.quick else ""))
        if (self.out / "results.json").exists() and not args.overwrite:
            raise ValueError(f"--out {self.out}: holds results.json from an earlier evaluation; pass --overwrite "
                             f"to replace it or --out to write elsewhere")
        config = _model_config(self.model_dir)
        self.scanner_only = config is not None and "encoder" not in config
        if self.scanner_only and args.product == "only":
            raise ValueError(f"--product only: {self.model_dir} holds a scanner only (converted from the original code), "
                             f"and the product stage stamps photos, which needs an encoder")
        if self.scanner_only and args.write_calibration:
            raise ValueError(f"--write_calibration: {self.model_dir} holds a scanner only (converted from the original "
                             f"code), and a calibration needs stamped photos, which need an encoder")
        if args.write_calibration and (self.model_dir / CALIBRATION_NAME).exists() and not args.overwrite:
            raise ValueError(f"{self.model_dir / CALIBRATION_NAME}: exists; pass --overwrite to replace it")
        # a shipped model folder has no args.json: its config.json records the training --std as "sigma"
        trained_std = self.run_args.get("std", _model_sigma(self.model_dir))
        smoothed = args.judge == "smoothed" or (args.judge == "auto" and (trained_std or args.sigma))
        self.sigma = (args.sigma or trained_std) if smoothed else None
        if smoothed and self.sigma is None:
            raise ValueError("--judge smoothed needs --sigma: the run gives no training --std")

    def _report_unreadable(self, start: int, what: str) -> None:
        """Log the files the dataset skipped since entry `start` of its .skipped, one line each."""
        new = self.images.skipped[start:]
        if new:
            self.log(f"warning: {len(new)} unreadable file(s) {what}:\n"
                     + "\n".join(f"  {path}: {reason}" for path, reason in new))

    # ---------------------------------------------------------------- stages
    def load(self):
        args = self.args
        self.device = pick_device(args.device)
        seed_everything(args.seed)
        self.encoder, self.scanner, self.config = load_pretrained(self.model_dir, device=self.device)
        self.scanner_only = self.encoder is None
        self.scanner.eval()
        if self.scanner_only:
            self.log(f"note: {SCANNER_ONLY_NOTE}")
        # the original code's networks take 400×400 only: photos are fitted to that, not tiled
        self.fit = self.scanner.input_size or (None if self.scanner_only else self.encoder.input_size)
        paths = resolve_image_paths(args.data_path, log=self.log)
        self.paths = paths  # replaced by the held-out split below when the run trained on these photos
        self.data_text = str(args.data_path or "the scikit-image sample photos")
        if self.run_args and not args.all_images and _same_data(args.data_path, self.run_args.get("train_path")):
            paths = self.paths = split_files(paths, seed=self.run_args.get("split_seed", 0)).test
            self.data_text += f" (the run's held-out test split: {', '.join(p.name for p in paths[:6])}" + \
                              (", ..." if len(paths) > 6 else "") + ")"
            self.log(f"evaluating on the run's held-out test split of its training data: {len(paths)} photos "
                     f"(--all_images uses every photo)")
        elif self.run_args and isinstance(self.run_args.get("train_path"), list) and any(
                _same_data(args.data_path, [folder]) for folder in self.run_args["train_path"]):
            self.log(f"warning: {args.data_path} is one of the folders this run was trained on (its held-out split "
                     f"was drawn from all of them together): most of these photos were seen in training")
        with warnings.catch_warnings():  # reported below, one line per file, and in results.json
            warnings.simplefilter("ignore", UnreadableImageWarning)
            if self.fit:
                dataset = ImageFolderDataset(paths, self.fit, mode="center")
                batch = args.batch_size
                self.log(f"each photo fitted to {self.fit}×{self.fit} (centre square, resized, like the original "
                         f"code's ImageOps.fit: the network takes {self.fit}×{self.fit} only; --size does not apply)")
            elif args.working_size is not None:
                dataset = _AtWorkingSize(ImageFolderDataset(paths, None, mode="full"), args.working_size)
                batch = 1
            elif args.size:
                tiles = math.ceil(args.max_images / len(paths)) if args.max_images else None
                dataset = ImageFolderDataset(paths, args.size, mode="grid", max_tiles_per_image=tiles)
                batch = args.batch_size
            else:
                dataset = ImageFolderDataset(paths, None, mode="full")
                batch = 1
        self.images = dataset  # its .skipped lists the unreadable files (the loader has no worker processes)
        self._report_unreadable(0, f"left out of the {len(paths)} photos")
        count = len(dataset) if args.max_images is None else min(args.max_images, len(dataset))
        self.dataset = torch.utils.data.Subset(dataset, range(count))
        # Tiles of one photo are one sample: statistics are by photo (report.detection.by_photo), and attacks and
        # certification take one tile per photo.
        self.photo_ids = torch.tensor([dataset.photo_index(i) for i in range(count)], dtype=torch.long)
        self.first_tile = torch.ones(count, dtype=torch.bool)
        self.first_tile[1:] = self.photo_ids[1:] != self.photo_ids[:-1]
        self.loader = DataLoader(self.dataset, batch_size=batch, shuffle=False)
        self.photos = len(paths)
        self.judge = Judge(self.scanner, self.sigma, n=args.predict_n, alpha=args.alpha,
                           batch_size=args.noise_batch, seed=args.seed, sequential=args.sequential == "on")
        self.lpips_note = None
        notes = []
        self.lpips = None if self.scanner_only else load_lpips(self.device, log=notes.append)
        if self.lpips is None:
            self.lpips_note = ("n/a: needs an encoder" if self.scanner_only else
                               "n/a: " + notes[0].split(": ", 1)[-1] if notes else "n/a")
        self.log(f"{self.model_dir}: {self.judge.describe()}; {count} "
                 f"{'tiles' if args.size and not self.fit and args.working_size is None else 'photos'} from "
                 f"{self.photos} photos on {self.device}")

    def detection(self):
        conditions = table1_conditions()
        forwarding = self._forwarding_conditions()
        keep = max(self.args.attack_images, self.args.certify_images if self.sigma else 0)
        inner = tqdm(total=len(self.dataset), desc="photos", unit="img", leave=False, file=sys.stderr,
                     dynamic_ncols=True)
        before = len(self.images.skipped)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnreadableImageWarning)
            self.pass_ = detection_pass(self.encoder, self.judge, self.loader, {**conditions, **forwarding},
                                        self.device, seed=self.args.seed, lpips_model=self.lpips, keep=keep,
                                        keep_mask=self.first_tile, progress=inner.update)
        inner.close()
        self._report_unreadable(before, "whose pixel data failed to decode; their tiles were replaced by the next "
                                        "readable photo's")
        self.table1 = {name: self._photo_row(name) for name in conditions}
        self.forwarding = {name: self._photo_row(name) for name in forwarding} if forwarding else None
        ids = self.photo_ids
        per_photo = {m: photo_means(self.pass_[m], ids) if self.pass_[m] is not None and len(self.pass_[m]) == len(ids)
                     else self.pass_[m] for m in ("psnr", "ssim", "lpips")}
        self.table2 = {"psnr": mean_std(per_photo["psnr"]), "ssim": mean_std(per_photo["ssim"]),
                       "lpips": mean_std(per_photo["lpips"]), "lpips_note": self.lpips_note,
                       "by": "photo (the mean over its tiles)", "n_tiles": len(self.pass_["psnr"])}
        if self.original:
            self.original_ = {"table1": self._original_table1(conditions),
                              "forwarding": self._original_table1(forwarding) if forwarding else None,
                              "table1_judge": (f"mean over {self.args.predict_n} noisy single passes (σ {self.sigma}) of "
                                               f"the argmax accuracy, no vote, no abstention" if self.sigma
                                               else "the scanner's argmax")}

    def _forwarding_conditions(self) -> dict:
        """Table 1b's conditions (report.conditions.forwarding_conditions); {} with --forwarding off. Each is
        judged in the same detection pass as Table 1 (clean and stamped photos, the same judge, by photo). The
        forwarded photo is judged at the size it arrives at, as scan.py (which never upscales) would judge it:
        a tile, stamped as a photo of its own, is forwarded and judged whole; a photo at the working resolution
        or at native resolution likewise. A fixed-size network (self.fit) gets the received file fitted to its
        input again (stamp.fit_pixels, ImageOps.fit), as scan.py prepares any photo for it."""
        self.forwarding_settings = None
        if self.args.forwarding == "off":
            return {}
        conditions = forwarding_conditions(functools.partial(fit_pixels, size=self.fit) if self.fit else None)
        if self.fit:
            judged = (f"the received file fitted to {self.fit}×{self.fit} again (centre square, resized, like "
                      f"ImageOps.fit), as scan.py prepares a photo for this fixed-size network")
        elif self.args.working_size is not None or not self.args.size:
            judged = ("each photo, saved as 8-bit pixels at the resolution it is evaluated at, forwarded and judged "
                      "at the size it arrives at (scan.py never upscales)")
        else:
            judged = (f"each {self.args.size}×{self.args.size} tile, stamped as a photo of its own and saved as 8-bit "
                      f"pixels, forwarded and judged whole at the size it arrives at (no resizing back)")
        self.forwarding_settings = {"conditions": {name: f.describe() for name, f in conditions.items()},
                                    "judged": judged}
        return conditions

    def _original_table1(self, conditions) -> dict:
        """Table 1 (or 1b: `conditions` are its names) the original way: a smoothed scanner's accuracy is the mean
        over the n noisy single passes of the detection pass (--predict_n, the original's 1,000) of the argmax
        accuracy, with no vote and no abstention: per image, the share of passes that read it right (the vote share
        of PREDICT's own samples, so this costs nothing more). A plain scanner's is its argmax accuracy, as in the
        strict protocol. Per photo (the mean over its tiles), then over photos."""
        table = {}
        for name in conditions:
            (vc, vs), (sc, ss) = self.pass_["verdicts"][name], self.pass_["scores"][name]
            if self.sigma:
                right_clean, right_stamped = 1 - sc.double(), ss.double()
            else:
                right_clean, right_stamped = (vc == CLEAN).double(), (vs == STAMPED).double()
            clean = photo_means(right_clean, self.photo_ids).mean().item()
            stamped = photo_means(right_stamped, self.photo_ids).mean().item() if len(vs) else None
            table[name] = {"acc_clean": clean, "acc_stamped": stamped,
                           "acc": (clean + stamped) / 2 if stamped is not None else None,
                           "n": len(torch.unique(self.photo_ids)), "n_tiles": len(vc)}
        return table

    def _photo_scores(self, condition: str) -> tuple[tuple, tuple]:
        """((clean verdicts, clean scores), (stamped verdicts, stamped scores)) of `condition`, one per photo."""
        (vc, vs), (sc, ss) = self.pass_["verdicts"][condition], self.pass_["scores"][condition]
        clean = by_photo(vc, sc, self.photo_ids)
        stamped = by_photo(vs, ss, self.photo_ids) if len(vs) else (vs, ss)
        return clean, stamped

    def _photo_row(self, condition: str) -> dict:
        (vc, sc), (vs, ss) = self._photo_scores(condition)
        return {**accuracy_row(vc, vs, sc, ss), "n_tiles": len(self.pass_["verdicts"][condition][0])}

    def calibration(self):
        (_, clean), (_, stamped) = self._photo_scores("none")
        self.calibration_ = {
            "score": ("fraction of noisy samples read as stamped" if self.sigma else
                      "logit(stamped) − logit(clean)"),
            "by": "photo: a photo's score is the maximum over its tiles (flagged when any tile is); the counts "
                  "and 'backed' are distinct photos",
            "n_tiles": len(self.pass_["scores"]["none"][0]),
            "roc": roc_curve(clean, stamped),
            "operating_points": [operating_point(clean, stamped, fpr) for fpr in TARGET_FPRS],
            # each photo's two scores, so that a threshold can be chosen again without judging the photos again
            "photo_scores": [{"photo": self.images.paths[i].name, "clean": c, "stamped": s} for i, c, s in
                             zip(torch.unique(self.photo_ids).tolist(), clean.tolist(), stamped.tolist())],
        }
        self.calibration_["auc"] = self.calibration_["roc"]["auc"]

    def product(self):
        """The product stage (product.stage): stamp.py → platform pipelines → scan.py, judged by scan.py's own
        PhotoScanner at its defaults (the model's calibration; with --write_calibration, the one chosen here)."""
        args = self.args
        settings = ScanSettings(model=str(args.checkpoint), device=args.device, seed=args.seed,
                                working_size=DEFAULT_WORKING_SIZE if args.working_size is None else args.working_size,
                                sigma=self.sigma, plain=self.sigma is None,
                                n=args.predict_n if args.quick else None)  # --quick: small n, as its other stages
        scanner = PhotoScanner(settings, self.log, calibration=not args.write_calibration,
                               loaded=(self.model_dir, self.run_dir, self.run_args, self.encoder, self.scanner,
                                       self.config))
        count = len(self.paths) if args.max_images is None else min(args.max_images, len(self.paths))
        stage = ProductStage(scanner, self.paths[:count], StageSettings(
            sizes=self.product_sizes, other_photos=args.product_photos, calibrate=args.write_calibration,
            pipelines=QUICK_PIPELINES if args.quick else SHORT_PIPELINES if args.product_pipelines == "short"
            else tuple(PIPELINES),
            calibration_copies=args.calibration_copies), log=self.log, lpips_model=self.lpips)
        self.product_ = stage.run()
        self.product_figure = stage.figure(self.product_, self.out / "visibility.png")
        tqdm.write(render_product(self.product_), file=sys.stderr)

    def attacks(self):
        args = self.args
        clean, stamped = self.pass_["kept"]
        clean, stamped = clean[:args.attack_images], stamped[:args.attack_images]
        overrides = {"eps": self.eps, "seed": args.seed, "batch_size": args.batch_size, "smooth_n": args.predict_n,
                     "smooth_alpha": args.alpha, "noise_batch": args.noise_batch}
        overrides.update({k: getattr(args, k) for k in ("apgd_iters", "square_queries", "eot_iter")
                          if getattr(args, k) is not None})
        settings = AttackSettings.quick(**overrides) if args.quick else AttackSettings(**overrides)
        self.table3 = robustness_table(self.scanner, clean.to(self.device), stamped.to(self.device), settings,
                                       sigma=self.sigma)
        self.table3["images"] = len(clean)

    def certification(self):
        args = self.args
        clean, stamped = self.pass_["kept"]
        count = min(args.certify_images, len(clean))
        items = [(image, label) for i in range(count) for image, label in ((clean[i], CLEAN), (stamped[i], STAMPED))]
        generator = torch.Generator(device=self.device if self.device.type == "cuda" else "cpu")
        generator.manual_seed(certify_seed(args.seed))
        rows = write_tsv(certify_labelled(Smooth(self.scanner, self.sigma), items, n0=args.n0, n=args.certify_n,
                                          alpha=args.alpha, batch_size=args.noise_batch, generator=generator),
                         self.out / f"certify_sigma{self.sigma:g}.tsv")
        groups = {"all": rows, "clean": [r for r in rows if r.label == CLEAN],
                  "stamped": [r for r in rows if r.label == STAMPED]}
        self.certification_ = {name: {str(k): v for k, v in certified_accuracy(g, RADII).items()}
                               for name, g in groups.items()}
        self.certification_.update(sigma=self.sigma, n0=args.n0, n=args.certify_n, alpha=args.alpha,
                                   images=count, seconds_per_image=sum(r.time for r in rows) / max(1, len(rows)))

    def original_protocol(self):
        """Tables 2 and 3 the original code's way (report.original_protocol); its Table 1 came with detection."""
        args = self.args
        quality = original_image_quality(self.encoder, self.loader, self.device, lpips_model=self.lpips)
        for metric in ("psnr", "ssim", "lpips"):  # the layout of our Table 2: n = batches, empty when n/a
            stats = quality[metric]
            quality[metric] = ({**stats, "n": quality["n_batches"]} if stats else
                               {"mean": math.nan, "std": math.nan, "n": 0})
        self.original_["table2"] = quality
        self.original_["table2"]["note"] = (
            f"PSNR from each batch's MSE of the unclamped x + δ, SSIM (11-px Gaussian window, σ 1.5, no padding) "
            f"and LPIPS per batch of {self.original_['table2']['batch_size']}, mean ± std across the "
            f"{self.original_['table2']['n_batches']} batches ({self.original_['table2']['n_images']} images), as "
            f"the original's compare_img_similarity.py")
        if args.attack_images == 0:
            return
        clean, stamped = self.pass_["kept"]
        clean, stamped = clean[:args.attack_images], stamped[:args.attack_images]
        overrides = {"seed": args.seed, "batch_size": args.batch_size, "noise_batch": args.noise_batch}
        overrides.update({k: getattr(args, k) for k in ("apgd_iters", "square_queries")
                          if getattr(args, k) is not None})
        settings = AttackSettings.quick(**overrides) if args.quick else AttackSettings(**overrides)
        table = original_attack_table(self.scanner, clean.to(self.device), stamped.to(self.device), self.sigma,
                                      eps=self.original_eps, settings=settings, passes=args.passes,
                                      pgd_steps=args.pgd_steps)
        judged = (f"the mean accuracy of {args.passes} single noisy passes (σ {self.sigma})" if self.sigma
                  else "the scanner's argmax")
        table["note"] = (f"{table['n_clean']} clean and {table['n_stamped']} stamped photos. Every attack is crafted "
                         f"on the base scanner without noise (no EOT) and scored by {judged}; noise: x + ε·N(0, I), "
                         f"FGSM: one signed-gradient step, PGD-40: {table['settings']['pgd_steps']} steps with a "
                         f"random start; APGD-CE and Square as pyautoattack's; adaptive: Square, then APGD-CE where "
                         f"Square failed. Every image is scored (the original's stale batch index scored only its last "
                         f"batch).")
        self.original_["table3"] = table

    def results(self, seconds: float) -> dict:
        args = self.args
        size_text = f"tiles of {args.size}×{args.size}" if args.size else "photos at native resolution"
        if args.working_size is not None:
            size_text = (f"photos at the working resolution (long side {args.working_size})" if args.working_size
                         else "photos at native resolution")
        if self.fit:
            size_text = f"photos fitted to {self.fit}×{self.fit} (centre square, resized, like ImageOps.fit)"
        return {
            "settings": {
                "model": str(self.model_dir), "run": str(self.run_dir) if self.run_dir else None,
                "data": self.data_text, "photos": self.photos, "images": len(self.dataset),
                "size": self.fit or (0 if args.working_size is not None else args.size), "fitted_to": self.fit,
                "working_size": None if self.fit else args.working_size, "size_text": size_text,
                "scanner_only": self.scanner_only, "note": SCANNER_ONLY_NOTE if self.scanner_only else None,
                "judge": self.judge.describe(), "sigma": self.sigma,
                "quick": args.quick, "seed": args.seed, "git_commit": git_commit(), "device": str(self.device),
                "predict_n": args.predict_n, "alpha": args.alpha, "eps_255": [e * 255 for e in self.eps],
                "sequential": args.sequential == "on", "samples_per_verdict": samples_summary(self.judge.n_used),
                "forwarding": self.forwarding_settings,
                "seconds": round(seconds, 1), "argv": sys.argv[1:],
                "unreadable": [{"path": str(path), "reason": reason} for path, reason in self.images.skipped],
            },
            "protocol": args.protocol,
            "table1": self.table1, "forwarding": self.forwarding,
            "table2": self.table2, "table3": getattr(self, "table3", None),
            "calibration": getattr(self, "calibration_", None),
            "certification": getattr(self, "certification_", None),
            "original": getattr(self, "original_", None),
            "product": getattr(self, "product_", None),
            "paper": self.paper(size_text),
        }

    def paper(self, size_text: str) -> dict:
        """The paper's numbers for the row this model corresponds to (report.paper), and how its setting differs."""
        config = self.config  # config.json, as load_pretrained read it
        kind = self.args.paper_row if self.args.paper_row != "auto" else model_kind(self.run_args, config,
                                                                                     self.model_dir.name)
        row3 = paper_tables.table3_row(kind, self.sigma)
        return {
            "kind": kind, "name": paper_tables.KIND_NAMES.get(kind),
            "table1": paper_tables.TABLE1.get(kind), "table2": paper_tables.TABLE2.get(kind),
            "table3_row": row3, "table3": paper_tables.TABLE3.get(row3), "eps_255": list(paper_tables.EPS_255),
            "differences": setting_differences(self.run_args, config, self.data_text, size_text),
            "note": None if kind else "which of the paper's models this is is unknown: pass --paper_row",
        }

    def run(self) -> dict:
        t0 = time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        stages = [s for s in self.STAGES
                  if not (s == "adversarial attacks" and (self.args.attack_images == 0 or not self.strict))
                  and not (s == "certification" and (not self.sigma or self.args.certify_images == 0
                                                     or not self.strict))
                  and not (s == "original protocol" and not self.original)
                  and not (s == "product" and (self.args.product == "off" or self.scanner_only))
                  and not (self.args.product == "only" and s not in ("load", "product", "write"))
                  # stamped photos need an encoder
                  and not (self.scanner_only and s in ("calibration", "adversarial attacks", "certification",
                                                       "original protocol"))]
        bar = tqdm(stages, desc="evaluate", unit="stage", file=sys.stderr, dynamic_ncols=True)
        for stage in bar:
            bar.set_postfix_str(stage)
            if stage == "load":
                self.load()
            elif stage == "detection and imperceptibility":
                self.detection()
                if not self.scanner_only and set(self.LONG_STAGES) & set(stages):  # show what is known now
                    tqdm.write("\n".join(["== detection done; the other stages follow",
                                           *self._detection_lines(self.table1, self.forwarding, self.table2)]),
                               file=sys.stderr)
            elif stage == "calibration":
                self.calibration()
            elif stage == "product":
                self.product()
            elif stage == "adversarial attacks":
                self.attacks()
            elif stage == "certification":
                self.certification()
            elif stage == "original protocol":
                self.original_protocol()
            elif self.args.product == "only":
                results = self.product_results(time.time() - t0)
                files = self.write_product(results)
            else:
                results = self.results(time.time() - t0)
                files = self.write(results)
        bar.close()
        if self.args.product == "only":
            self.log(f"\n== product stage of {self.model_dir} in {results['settings']['seconds']:.0f} s: "
                     + product_summary(results["product"]) + f"\n   wrote {len(files)} files to {self.out}/")
        else:
            self.summary(results, files)
        return results

    # ---------------------------------------------------------------- outputs
    def product_results(self, seconds: float) -> dict:
        """results.json of --product only: the settings that apply, and the product stage's results."""
        args = self.args
        return {"settings": {"model": str(self.model_dir), "run": str(self.run_dir) if self.run_dir else None,
                             "data": self.data_text, "photos": self.photos, "quick": args.quick, "seed": args.seed,
                             "git_commit": git_commit(), "device": str(self.device), "seconds": round(seconds, 1),
                             "argv": sys.argv[1:]},
                "product": self.product_}

    def write_product(self, results: dict) -> list[Path]:
        """product.md and visibility.png (and MODEL/calibration.json with --write_calibration); results.json too
        with --product only."""
        files = []
        if self.args.product == "only":
            (self.out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
            files.append(self.out / "results.json")
        (self.out / "product.md").write_text(render_product(results["product"]))
        files.append(self.out / "product.md")
        if self.product_figure is not None:
            files.append(self.product_figure)
        if self.args.write_calibration:
            record = calibration_record(results["product"], evaluated=_shown(self.out / "results.json"),
                                        data=self.data_text, git_commit=git_commit(), quick=self.args.quick)
            path = self.model_dir / CALIBRATION_NAME
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(record, indent=2, default=float) + "\n")
            tmp.replace(path)
            files.append(path)
            self.log(f"wrote {path}: " + ("backed" if record["backed"] else "NOT backed") +
                     f", {record['false_positives']} of {record['n_clean']} clean photos flagged under scan.py's rule "
                     f"(FPR ≤ {100 * record['fpr_upper_bound']:.2f}% at 95%), {100 * record['tpr']:.1f}% of stamped "
                     f"photos caught")
        return files

    def write(self, results: dict) -> list[Path]:
        (self.out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
        markdown = render_markdown(results)
        if results["product"]:
            markdown += "\n" + render_product(results["product"])
        (self.out / "tables.md").write_text(markdown)
        files = [self.out / "results.json", self.out / "tables.md", *write_csvs(results, self.out),
                 *write_plots(results, self.out)]
        if results["product"]:
            files += self.write_product(results)
        with SummaryWriter(self.out / "tb") as writer:
            writer.add_text("eval/tables", markdown)
            for name, row in results["table1"].items():
                for key in ("acc", "acc_clean", "acc_stamped", "auc"):
                    if row[key] is not None:  # None: a scanner-only model's stamped figures
                        writer.add_scalar(f"eval/table1/{name}/{key}", row[key])
            for name, row in (results["forwarding"] or {}).items():
                for key in ("acc", "acc_clean", "acc_stamped", "auc"):
                    if row[key] is not None:
                        writer.add_scalar(f"eval/forwarding/{name}/{key}", row[key])
            for metric in ("psnr", "ssim", "lpips"):
                if results["table2"][metric]["n"]:
                    writer.add_scalar(f"eval/table2/{metric}", results["table2"][metric]["mean"])
            for attack, by_eps in ((results["table3"] or {}).get("attacks") or {}).items():
                for row in by_eps.values():
                    writer.add_scalar(f"eval/table3/{attack}/acc", row["acc"], round(row["eps"] * 255))
        return files

    def summary(self, results: dict, files: list[Path]):
        if self.scanner_only:
            return self.scanner_only_summary(results, files)
        lines = ["", f"== evaluated {self.model_dir} in {results['settings']['seconds']:.0f} s "
                     f"({results['settings']['images']} images, {self.judge.describe()})",
                 *self._detection_lines(results["table1"], results["forwarding"], results["table2"])]
        for point in results["calibration"]["operating_points"]:
            lines.append(f"   FPR ≤ {100 * point['target_fpr']:g}%: threshold {point['threshold']:.4g}, TPR "
                         f"{100 * point['tpr']:.1f}%" + ("" if point["backed"] else
                                                          f" (not backed: needs ≥ {point['clean_needed']} clean photos)"))
        if results["table3"]:
            for attack, by_eps in results["table3"]["attacks"].items():
                accs = ", ".join(f"{r['eps'] * 255:g}: {100 * r['acc']:.0f}%" for r in by_eps.values())
                lines.append(f"   {attack} accuracy by ε/255: {accs}")
        if results["certification"]:
            c = results["certification"]
            lines.append(f"   certified accuracy (σ {c['sigma']}): " + ", ".join(
                f"r {float(r):g}: {100 * v:.0f}%" for r, v in list(c["all"].items())[:4]))
        if results["product"]:
            lines += ["   product stage (stamp.py → platform pipelines → scan.py; product.md):",
                      product_summary(results["product"])]
        unreadable = results["settings"]["unreadable"]
        if unreadable:
            lines.append(f"   {len(unreadable)} unreadable file(s) skipped: " + ", ".join(
                f"{Path(u['path']).name} ({u['reason'].split(' (')[0]})" for u in unreadable[:10])
                         + (f" and {len(unreadable) - 10} more" if len(unreadable) > 10 else "")
                         + " (all in results.json)")
        lines.append(f"   wrote {len(files)} files to {self.out}/ (tables.md, results.json, CSVs, plots, tb/)")
        self.log("\n".join(lines))

    @staticmethod
    def _detection_lines(t1: dict, forwarding: dict | None, t2: dict) -> list[str]:
        """The summary's lines on Tables 1, 1b and 2, printed again as soon as the detection stage has them."""
        worst = min(t1, key=lambda k: t1[k]["acc"])
        return [f"   no corruption: clean {100 * t1['none']['acc_clean']:.1f}% / stamped "
                f"{100 * t1['none']['acc_stamped']:.1f}%, ROC-AUC {t1['none']['auc']:.4f}",
                f"   mixed chain: {100 * t1['mixed chain (JPEG q75)']['acc']:.1f}%; worst condition: {worst} "
                f"({100 * t1[worst]['acc']:.1f}%)",
                *(["   forwarding (Table 1b): " + ", ".join(f"{name} {100 * row['acc']:.1f}%" for name, row in
                                                         forwarding.items())] if forwarding else []),
                f"   PSNR {t2['psnr']['mean']:.2f} ± {t2['psnr']['std']:.2f} dB, SSIM {t2['ssim']['mean']:.4f}, "
                f"LPIPS {'%.4f' % t2['lpips']['mean'] if t2['lpips']['n'] else t2['lpips_note']}"]

    def scanner_only_summary(self, results: dict, files: list[Path]):
        t1 = results["table1"]
        worst = max(t1, key=lambda k: t1[k]["fpr"])
        lines = ["", f"== evaluated {self.model_dir} in {results['settings']['seconds']:.0f} s "
                     f"({results['settings']['images']} clean photos, {self.judge.describe()})",
                 f"   SCANNER ONLY: {SCANNER_ONLY_NOTE}",
                 f"   no corruption: clean photos read as clean {100 * t1['none']['acc_clean']:.1f}%, false positives "
                 f"{100 * t1['none']['fpr']:.1f}%",
                 (f"   most false positives: {worst} ({100 * t1[worst]['fpr']:.1f}%)" if t1[worst]["fpr"] > 0 else
                  "   no false positive under any condition"),
                 *(["   false positives after forwarding (Table 1b): " + ", ".join(
                     f"{name} {100 * row['fpr']:.1f}%" for name, row in results["forwarding"].items())]
                   if results["forwarding"] else []),
                 f"   wrote {len(files)} files to {self.out}/ (tables.md, results.json, CSVs, tb/)"]
        self.log("\n".join(lines))


class _AtWorkingSize(torch.utils.data.Dataset):
    """Whole photos brought to scan.py's working resolution (stamp.to_working: long side `size`, antialiased
    bilinear; 0 = native). Keeps the wrapped dataset's .paths, .skipped and photo_index."""

    def __init__(self, dataset: ImageFolderDataset, size: int):
        self.dataset, self.size = dataset, size
        self.paths, self.skipped, self.photo_index = dataset.paths, dataset.skipped, dataset.photo_index

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return to_working(self.dataset[i][None], self.size)[0].clamp(0, 1)


def samples_summary(n_used: list[int]) -> dict | None:
    """The noisy copies each smoothed verdict took (Tables 1 and 1b, every condition, clean and stamped): their
    mean, median and how many verdicts took each number; None for a plain scanner."""
    if not n_used:
        return None
    values = torch.tensor(n_used, dtype=torch.float64)
    counts = torch.unique(values.long(), return_counts=True)
    return {"verdicts": len(n_used), "mean": values.mean().item(), "median": values.median().item(),
            "distribution": {str(int(k)): int(c) for k, c in zip(*counts)}}


def certify_seed(seed: int) -> int:
    """The seed of CERTIFY's noise: a stream of its own (numpy's SeedSequence of (seed, 1)), so that its draws are
    independent of PREDICT's (the judge's generator is seeded with `seed` itself); sharing one seed would make
    CERTIFY's first noisy copies repeat PREDICT's."""
    import numpy as np

    return int(np.random.SeedSequence((seed, 1)).generate_state(1, dtype=np.uint64)[0] >> 1)


def _model_config(model_dir: Path) -> dict | None:
    """The model's config.json as a dict (None when absent or unreadable: load_pretrained then says why)."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _model_sigma(model_dir: Path):
    """The "sigma" a training run recorded in the model's config.json (None when absent or unreadable)."""
    return (_model_config(model_dir) or {}).get("sigma")


def _shown(path: Path) -> str:
    """A path as a record should show it: relative to the working directory when inside it (a model folder's
    calibration then names the run folder, not where the machine kept it)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.compare:
            out = compare(args.compare, args.out or Path("results") / "compare.md")
            print(f"wrote {out} and {out.with_suffix('.json')}: the paper's three tables for {len(args.compare)} "
                  f"model(s), ours (strict and original protocols) beside the paper's")
            return {"compare": str(out)}
        return Evaluation(args).run()
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")


if __name__ == "__main__":
    main()
