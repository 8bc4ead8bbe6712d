"""Scan photos for DeepRAFT's stamp: one verdict per image, stamped, clean or abstain, with its score.

    python scan.py --model pretrained_models/rs_aug received.jpg inbox/
    python scan.py --model pretrained_models/rs_aug inbox/ --json > verdicts.jsonl
    python scan.py --model pretrained_models/rs_aug photo.jpg --certify --n 10000 --alpha 0.001

Each INPUT is an image file or a folder (searched recursively; hidden files are skipped). Every photo is read
upright (EXIF orientation applied), brought to the working resolution that stamp.py stamps at (long side
--working_size, antialiased; smaller images as they are) and judged there, one image at a time. A scanner
that takes one input size only (the original code's detector, `python -m models.convert_original`: 400×400)
sees each photo fitted to that size instead, as the original code fits it (ImageOps.fit: centre square,
resized). A model folder that holds a scanner only (no encoder) scans like any other.

The judge. A plain scanner's score is the logit difference logit(stamped) − logit(clean). A scanner trained
with --std (its config.json records "sigma"; --sigma overrides, --plain ignores it) is judged smoothed, as
in Cohen et al.'s PREDICT: the score is the share of --n noisy copies x + N(0, σ²) that the scanner reads
as stamped; the verdict is ABSTAIN when a two-sided binomial test cannot tell that share from the threshold
at --alpha (at the threshold ½ this is exactly PREDICT). --certify certifies the verdict itself: from --n
fresh noisy copies it computes an L2 radius r (in [0,1]-pixel units, at the resolution scanned) such that,
with confidence 1 − alpha, the smoothed verdict (P(stamped) > threshold, or ≤) holds for every perturbation
of L2 norm < r (smoothing.core.threshold_radius; at the threshold ½ this is Cohen's CERTIFY with the verdict
as its selection step). When the bound does not clear the threshold, or the verdict abstains, the output says
"certified: false, radius 0": a certificate never names a class other than the verdict's.

The threshold: STAMPED when score > threshold. It is --threshold if given, else the one evaluate.py
--write_calibration stored in MODEL/calibration.json (a threshold whose false-positive rate is at most 1%
with 95% confidence on its clean photos, in the middle of the gap between the highest clean score it allows
and the next higher score), else the uncalibrated default (0 for the logit difference,
i.e. the scanner's argmax; ½ for the vote share, i.e. PREDICT's majority), and the output says
"uncalibrated". A calibration made for another kind of score (plain vs smoothed, another σ) is not used. One
that is used is compared with scan.py's own settings: the number of noisy copies (--n; smoothed only) and the
resolution photos are judged at (--working_size, or the fitted square of a fixed-size scanner). A single note
at the start names every setting that differs, the calibration's value against scan.py's: its false-positive
rate was measured under the calibration's settings and may not hold under others.

Output: one line per image on stdout (--json: one JSON object per line, with "path", "verdict"
(stamped|clean|abstain|error), "score", "threshold", "calibrated", "calibration_differs" (the names of the
settings that differ from the calibration's, only when some do), with --certify "certified" (the verdict it
certifies, "stamped" or "clean", or false), "radius" and "certificate" (what it means), "error" for a file
that could not be read), a progress bar for folders, and a summary on stderr. Unreadable files are
reported and the batch goes on. Exit status: 0 when every file was read, 1 when some could not be, 2 for bad
flags or a bad model.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from scipy.stats import binomtest
from tqdm import tqdm

from engine.cli import HelpFormatter, non_negative_int, positive_float, positive_int, significance
from engine.device import pick_device
from models import STAMPED
from models.io import CALIBRATION_NAME
from report.judge import Judge
from smoothing import ABSTAIN, Smooth
from smoothing.core import threshold_radius
from smoothing.sequential import look_schedule
from stamp import (DEFAULT_WORKING_SIZE, expand_inputs, fit_pixels, fit_text, load_model, pixels_to_tensor,
                   read_pixels, report_failures, to_working)

#: evaluate.py's names for the two kinds of score (report "calibration" → "score"); a calibration is used only
#: for the kind of score it was made on.
PLAIN_SCORE = "logit(stamped) − logit(clean)"
SMOOTHED_SCORE = "fraction of noisy samples read as stamped"
VERDICTS = {STAMPED: "stamped", 1 - STAMPED: "clean", ABSTAIN: "abstain"}


@dataclass
class Threshold:
    """The decision threshold (STAMPED iff score > value) and where it came from."""

    value: float
    source: str  # "flag", "calibration" or "default"
    text: str  # how a verdict line names it, e.g. "calibrated, FPR ≤ 1%"
    calibration: dict | None = None
    path: Path | None = None  # the calibration.json it came from
    differs: list[str] = field(default_factory=list)  # settings unlike the calibration's (calibration_differences)

    @property
    def calibrated(self) -> bool:
        return self.source == "calibration"


def resolve_threshold(given: float | None, model_dir: Path, sigma: float | None, log=print) -> Threshold:
    """--threshold, else MODEL/calibration.json when it was made for this kind of score, else the default."""
    score = SMOOTHED_SCORE if sigma is not None else PLAIN_SCORE
    default = 0.5 if sigma is not None else 0.0
    if given is not None:
        if sigma is not None and not 0 <= given <= 1:
            raise ValueError(f"--threshold {given:g}: a smoothed scanner's score is a share of votes in [0, 1]")
        return Threshold(given, "flag", "--threshold")
    path = model_dir / CALIBRATION_NAME
    if path.is_file():
        try:
            cal = json.loads(path.read_text())
            value = float(cal["threshold"])
            made_for, made_sigma = cal["score"], cal.get("sigma")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a calibration written by evaluate.py --write_calibration ({e})") from None
        if made_for != score or (sigma is not None and (made_sigma is None or not math.isclose(made_sigma, sigma))):
            made = f"{made_for!r}" + (f" at σ {made_sigma:g}" if made_sigma is not None else "")
            now = f"{score!r}" + (f" at σ {sigma:g}" if sigma is not None else "")
            log(f"note: {path} calibrates {made}, not {now}: using the uncalibrated threshold {default:g}")
        else:
            target = f"FPR ≤ {100 * cal.get('target_fpr', float('nan')):g}%"
            if cal.get("backed", False):
                text = f"calibrated, {target}"
            else:
                text = f"calibrated on {cal.get('n_clean', '?')} clean images, too few to back {target}"
            return Threshold(value, "calibration", text, cal, path)
    return Threshold(default, "default", "uncalibrated")


def _resolution(kind: str, size: int) -> str:
    """How a note names a resolution: ("working", 0) native, ("working", W), ("fitted", F), ("tiles", S)."""
    if kind == "fitted":
        return f"on photos fitted to {size}×{size}"
    if kind == "tiles":
        return f"on {size}×{size} tiles, not at a working resolution"
    return f"at working size {size}" if size else "at native resolution"


def calibration_resolution(cal: dict) -> tuple[str, int] | None:
    """The resolution a calibration.json was measured at, as (kind, pixels); None when it does not say.

    evaluate.py records "fitted_to" (the square a fixed-input network's photos were fitted to, else null),
    "working_size" (the long side each photo was brought to, as scan.py's --working_size; 0 = native; null or
    absent when it scored tiles) and "size" (its tile side; 0 = whole photos at native resolution). Read in that
    order: ("fitted", F), ("working", W), else ("tiles", S) for S > 0 or ("working", 0) for S = 0 (calibrations
    written before "working_size" existed scored whole photos at native resolution when "size" was 0).
    """
    if cal.get("fitted_to") is not None:
        return "fitted", int(cal["fitted_to"])
    if cal.get("working_size") is not None:
        return "working", int(cal["working_size"])
    if cal.get("size") is not None:
        size = int(cal["size"])
        return ("tiles", size) if size else ("working", 0)
    return None


def calibration_differences(cal: dict, n: int | None, resolution: tuple[str, int]) -> list[tuple[str, str, str]]:
    """The settings under which scan.py judges that differ from those a calibration was measured under.

    Called only for a calibration that scan.py uses (same kind of score and σ: resolve_threshold has checked
    those). Compared:
      - "n": the calibration's "predict_n" (evaluate.py's number of noisy copies per verdict) against scan.py's
        --n; for a smoothed scanner only (`n` None for a plain one), and only when the calibration records it.
        The vote share's spread, hence the share of clean photos above a threshold, depends on n.
      - "working_size": the calibration's resolution (calibration_resolution) against scan.py's `resolution`,
        ("working", --working_size) or ("fitted", F) for a fixed-input scanner. A calibration made on S×S tiles
        always differs: scan.py never scans tiles.

    Returns:
        [(name, calibration's value, scan.py's value)], the values as a note words them ("n 1000",
        "on 400×400 tiles, not at a working resolution", "at working size 512"); [] when all match.
    """
    differs = []
    made_n = cal.get("predict_n")
    if n is not None and made_n is not None and int(made_n) != n:
        differs.append(("n", f"n {int(made_n)}", f"n {n}"))
    made_at = calibration_resolution(cal)
    if made_at is not None and made_at != resolution:
        differs.append(("working_size", _resolution(*made_at), _resolution(*resolution)))
    return differs


def differences_note(path: Path, differs: list[tuple[str, str, str]]) -> str:
    """One line naming every differing setting (calibration_differences), the calibration's value vs scan.py's."""
    made = " ".join(c for _, c, _ in differs)
    ours = " ".join(s for _, _, s in differs)
    return (f"note: {path} was made {'with ' if differs[0][0] == 'n' else ''}{made}; scan.py "
            f"{'uses' if differs[0][0] == 'n' else 'scans'} {ours}: the calibrated false-positive rate may not hold")


def smoothed_verdict(votes: int, n: int, threshold: float, alpha: float) -> int:
    """STAMPED if the share votes/n of noisy copies read as stamped is above `threshold`, CLEAN if not, ABSTAIN
    when a two-sided binomial test cannot tell the share from the threshold at level alpha. At threshold ½ this
    is Smooth.decide (PREDICT) for two classes. At 0 or 1 there is nothing to test: the share either exceeds
    the threshold or it does not."""
    share = votes / n
    if 0 < threshold < 1 and binomtest(votes, n, p=threshold).pvalue > alpha:
        return ABSTAIN
    return STAMPED if share > threshold else 1 - STAMPED


def _fmt(score: float, smoothed: bool) -> str:
    return f"{score:.3f}" if smoothed else f"{score:.3g}"


class PhotoScanner:
    """Judges one image at a time: (path) → a result dict (what --json prints)."""

    def __init__(self, args, log=print):
        self.args = args
        self.device = pick_device(args.device)
        # the encoder is not needed (None for a scanner-only folder, e.g. a converted original detector)
        self.model_dir, run_dir, run_args, _, scanner, config = load_model(args.model, self.device)
        self.fit = scanner.input_size  # the original's detector (arch 'deepraft') takes 400×400 only
        if args.plain:
            self.sigma = None
        elif args.sigma is not None:
            self.sigma = args.sigma
        else:
            trained = config.get("sigma", run_args.get("std"))
            self.sigma = float(trained) if trained is not None else None
        if args.certify and self.sigma is None:
            raise ValueError("--certify needs a smoothed scanner: this model was not trained with --std; pass "
                             "--sigma to smooth it anyway")
        self.judge = Judge(scanner, self.sigma, n=args.n, alpha=args.alpha, batch_size=args.batch_size,
                           seed=args.seed, sequential=False)
        # sequential PREDICT at scan.py's own threshold (the judge's sequential mode tests against ½), and --certify
        self.smooth = Smooth(scanner, self.sigma) if self.sigma is not None else None
        self.sequential = self.smooth is not None and args.sequential == "on"
        self.sequential_generator = torch.Generator(device=self.device).manual_seed(args.seed)
        # on the device, as certify.py and evaluate.py draw theirs: no noise made on the CPU and copied over
        self.certify_generator = (torch.Generator(device=self.device).manual_seed(args.seed + 1) if args.certify
                                  else None)
        self.threshold = resolve_threshold(args.threshold, self.model_dir, self.sigma, log)
        if self.threshold.calibrated:
            resolution = ("fitted", self.fit) if self.fit else ("working", args.working_size)
            differs = calibration_differences(self.threshold.calibration, args.n if self.sigma is not None else None,
                                              resolution)
            if differs:
                log(differences_note(self.threshold.path, differs))
            self.threshold.differs = [name for name, _, _ in differs]

    def describe(self) -> str:
        t = self.threshold
        if self.fit:
            size = fit_text(self.fit)
        else:
            size = "working resolution " + (f"long side {self.args.working_size} px" if self.args.working_size
                                            else "native resolution")
        extra = (f"; certifying each verdict with n {self.args.n} fresh noisy copies, alpha {self.args.alpha:g}"
                 if self.args.certify else "")
        judge = self.judge.describe()
        if self.sequential:
            schedule = look_schedule(self.args.n, t.value, self.args.alpha)
            judge += f" (sequential: stops at the first decisive look of {', '.join(map(str, schedule))} copies)"
        return f"{self.model_dir}: {judge}{extra}; STAMPED when score > {t.value:.4g} ({t.text}); {size}"

    def __call__(self, path: Path) -> dict:
        args = self.args
        pixels = read_pixels(path)  # ImageReadError (a ValueError) for a bad file
        if self.fit:
            x = pixels_to_tensor(fit_pixels(pixels, self.fit), self.device)
        else:
            x = to_working(pixels_to_tensor(pixels, self.device), args.working_size)
        verdict, score, n_used = self.judge_tensor(x)
        t = self.threshold.value
        result = {"path": str(path), "verdict": VERDICTS[verdict], "score": score, "threshold": t,
                  "calibrated": self.threshold.calibrated, "threshold_source": self.threshold.source,
                  "size": [pixels.shape[1], pixels.shape[0]], "scanned_at": [x.shape[-1], x.shape[-2]]}
        if self.threshold.differs:
            result["calibration_differs"] = list(self.threshold.differs)
        if self.sigma is not None:
            result.update(votes=round(score * n_used), n_used=n_used, n=args.n, sigma=self.sigma)
        if args.certify:
            result.update(self.certify(x[0], verdict, t))
        return result

    def judge_tensor(self, x: torch.Tensor) -> tuple[int, float, int]:
        """One image (1,3,H,W) in [0,1], at the resolution it is judged at → (verdict: STAMPED, CLEAN or ABSTAIN,
        score, noisy copies used: --n, fewer when sequential PREDICT stopped early, unused for a plain scanner)."""
        args, t = self.args, self.threshold.value
        x = x.contiguous(memory_format=torch.channels_last)
        if self.sequential:
            verdicts, votes, used = self.smooth.predict_sequential(
                x, args.n, args.alpha, args.batch_size, self.sequential_generator, threshold=t, positive=STAMPED)
            return int(verdicts[0]), int(votes[0]) / int(used[0]), int(used[0])
        verdicts, scores = self.judge(x)
        score = float(scores[0])
        if self.sigma is None:
            return (STAMPED if score > t else 1 - STAMPED), score, args.n
        return smoothed_verdict(round(score * args.n), args.n, t, args.alpha), score, args.n

    def certify(self, x: torch.Tensor, verdict: int, threshold: float) -> dict:
        """The certificate of a smoothed verdict → {"certified", "radius", "certificate", ...} for the result.

        The verdict chose the side ("P(stamped) > threshold" or "≤") from its own noise, so --n fresh noisy
        copies, drawn with another generator, bound that side's probability (one-sided Clopper–Pearson at
        alpha), and threshold_radius turns the bound into the radius. "certified" is the verdict certified
        ("stamped" or "clean"), or False with radius 0 when the bound does not clear the threshold or the
        verdict abstains (no fresh copies are drawn then). A radius of None means unbounded (threshold 0 or 1:
        the decision cannot change).
        """
        args = self.args
        if verdict == ABSTAIN:
            return {"certified": False, "radius": 0.0,
                    "certificate": "none: the verdict abstains, so there is no verdict to certify"}
        counts = self.smooth.counts(x, args.n, args.batch_size, self.certify_generator)
        votes = int(counts[STAMPED])
        above = verdict == STAMPED
        radius = threshold_radius(votes, args.n, threshold, self.sigma, args.alpha, above=above)
        name, side = VERDICTS[verdict], ("P(stamped) > " if above else "P(stamped) ≤ ") + f"{threshold:.4g}"
        record = {"certify_votes": votes, "certify_n": args.n}
        if radius <= 0:
            share = "lower" if above else "upper"
            return {**record, "certified": False, "radius": 0.0,
                    "certificate": f"none: the {share} confidence bound on P(stamped) from {votes} of {args.n} "
                                   f"fresh votes does not clear the threshold {threshold:.4g} at alpha "
                                   f"{args.alpha:g}"}
        if math.isinf(radius):
            meaning = (f"the {name} verdict ({side}) holds for every perturbation, whatever its norm "
                       f"(confidence 1 − {args.alpha:g})")
            return {**record, "certified": name, "radius": None, "certificate": meaning}
        meaning = (f"the {name} verdict ({side}) holds for every L2 perturbation of norm < {radius:.4g} "
                   f"([0,1] pixel units at the resolution scanned; confidence 1 − {args.alpha:g})")
        return {**record, "certified": name, "radius": radius, "certificate": meaning}

    def line(self, r: dict) -> str:
        """The human-readable verdict line of a result."""
        if r["verdict"] == "error":
            return f"{r['path']}: ERROR {r['error']}"
        smoothed = self.sigma is not None
        score, t = _fmt(r["score"], smoothed), _fmt(r["threshold"], smoothed)
        how = self.threshold.text
        if r["verdict"] == "abstain":
            text = (f"{r['path']}: ABSTAIN score {score}: {r['votes']} of {r['n_used']} votes cannot be told from "
                    f"threshold {t} at alpha {self.args.alpha:g} ({how})")
        else:
            sign = ">" if r["verdict"] == "stamped" else "≤"
            text = f"{r['path']}: {r['verdict'].upper()} score {score} {sign} threshold {t} ({how})"
        if "certificate" in r:
            text += (f"; certified: {r['certificate']}" if r["certified"]
                     else f"; certified: false, radius 0 ({r['certificate']})")
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scan.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and folders (searched recursively)")
    p.add_argument("--model", required=True,
                   help="a model folder (holding config.json, e.g. pretrained_models/rs_aug) or a run folder "
                        "(results/RUN, holding model/)")
    p.add_argument("--working_size", type=non_negative_int, default=DEFAULT_WORKING_SIZE,
                   help="long side in pixels at which photos are scanned; must be stamp.py's (0 = native)")
    p.add_argument("--threshold", type=_finite_float, default=None,
                   help="STAMPED when score > THRESHOLD; if not given, MODEL/calibration.json's, else 0 for a "
                        "plain scanner and ½ for a smoothed one")
    p.add_argument("--json", action="store_true", help="one JSON object per line on stdout instead of text")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    s = p.add_argument_group("randomized smoothing")
    how = s.add_mutually_exclusive_group()
    how.add_argument("--sigma", type=positive_float, default=None,
                     help="judge smoothed with this noise σ in [0,1] pixel units (default: the model's own, from "
                          "its config.json or the run's --std)")
    how.add_argument("--plain", action="store_true", help="judge by the plain scanner even if the model has a σ")
    s.add_argument("--n", type=positive_int, default=1000,
                   help="noise samples per image for the smoothed verdict (the most, with --sequential on), and "
                        "CERTIFY's estimation samples")
    s.add_argument("--sequential", choices=("on", "off"), default="on",
                   help="on: sequential PREDICT: look at the votes after 16, 64, 256, … copies "
                        "(a first look of 32 or more when the threshold is far from ½) and stop at the first "
                        "decisive look, with the same bound alpha on a wrong verdict (docs/smoothing.md); "
                        "off: always draw --n copies (Cohen's PREDICT)")
    s.add_argument("--alpha", type=significance, default=0.001, help="significance level of verdicts and certificates")
    s.add_argument("--certify", action="store_true",
                   help="also certify each verdict: the L2 radius (in [0,1] pixel units) within which it holds, "
                        "with confidence 1 − alpha; costs n more passes")
    s.add_argument("--n0", type=positive_int, default=100,
                   help="not used: Cohen's CERTIFY draws n0 copies to choose the class to certify; scan.py "
                        "certifies its verdict instead (kept so that old command lines still run)")
    s.add_argument("--batch_size", type=positive_int, default=200, help="noisy copies classified at once")
    s.add_argument("--seed", type=int, default=0, help="seed of the noise")
    return p


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def run(args, out=None, err=None) -> dict:
    """The CLI's work on parsed args → summary counts. Raises ValueError/FileNotFoundError (one line) for bad
    flags or a bad model; unreadable files are reported in the output and counted, never raised."""
    out, err = out or sys.stdout, err or sys.stderr

    def log(text):
        print(text, file=err, flush=True)

    scanner = PhotoScanner(args, log)
    items = expand_inputs(args.inputs)
    log(f"scanning {len(items)} input(s) with {scanner.describe()}")
    counts = {"stamped": 0, "clean": 0, "abstain": 0, "error": 0}
    unreadable = []  # (path, reason), listed again at the end
    t0 = time.perf_counter()
    bar = tqdm(items, unit="img", desc="scan", file=err, dynamic_ncols=True, disable=None if len(items) > 1 else True)
    for item in bar:
        if item.error is not None:
            result = {"path": str(item.path), "verdict": "error", "error": item.error}
        else:
            try:
                start = time.perf_counter()
                result = scanner(item.path)
                result["seconds"] = round(time.perf_counter() - start, 4)  # read, judge (and certify) this image
            except ValueError as e:  # ImageReadError: "<path>: <reason>"
                result = {"path": str(item.path), "verdict": "error",
                          "error": getattr(e, "reason", None) or str(e)}
        counts[result["verdict"]] += 1
        if result["verdict"] == "error":
            unreadable.append((result["path"], result["error"]))
        text = json.dumps(result, ensure_ascii=False) if args.json else scanner.line(result)
        tqdm.write(text, file=out)
        out.flush()
    bar.close()
    seconds = time.perf_counter() - t0
    read = len(items) - counts["error"]
    t = scanner.threshold
    log(f"scanned {read} of {len(items)} image(s) in {seconds:.1f} s"
        + (f" ({seconds / read:.2f} s/image)" if read else "")
        + f": {counts['stamped']} stamped, {counts['clean']} clean, {counts['abstain']} abstained, "
          f"{counts['error']} unreadable; threshold {t.value:.4g} ({t.text})")
    report_failures("unreadable", unreadable, file=err)
    return counts


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        counts = run(args)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130, "\ninterrupted\n")
    return 1 if counts["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
