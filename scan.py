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

The judge (product.scanning; evaluate.py's product stage judges through the same code). A plain scanner's
score is the logit margin logit(stamped) − logit(clean). A scanner trained with --std (its config.json records
"sigma"; --sigma overrides, --plain ignores it) is judged smoothed, as in Cohen et al.'s PREDICT: each of up to
--n noisy copies x + N(0, σ²) votes stamped when the scanner's logit margin on it is above --margin (m: the
calibrated margin, 0 = the scanner's argmax); the score is the share of stamped votes, and the verdict is
ABSTAIN when a binomial test cannot tell that share from the threshold at --alpha (sequential PREDICT: it
stops at the first decisive look). --certify certifies the verdict itself: from --n fresh noisy copies it
computes an L2 radius r (in [0,1]-pixel units, at the resolution scanned) such that, with confidence 1 − alpha,
the smoothed verdict holds for every perturbation of L2 norm < r (Cohen's CERTIFY at the threshold ½, with the
verdict as its selection step; smoothing.core.threshold_radius elsewhere). When the bound does not clear the
threshold, or the verdict abstains, the output says "certified: false, radius 0". The noise's seed is drawn
from the operating system unless --seed is given (noise that no one can predict from the code); it is printed
and recorded in each JSON line.

The rule's values: STAMPED when score > threshold. The threshold (and a smoothed scanner's margin) is
--threshold (--margin) if given, else what evaluate.py --write_calibration stored in MODEL/calibration.json
(measured under this very rule on clean and stamped photos: its false-positive rate is at most 1% with 95%
confidence when the calibration says "backed"), else the uncalibrated default (margin 0 for a plain scanner;
a vote share of ½ on the argmax's votes for a smoothed one), and the output says "uncalibrated". A smoothed
scanner's threshold is a vote share strictly between 0 and 1 (at 0 or 1 no test can be run). --n, --alpha and
--sequential default to the calibration's own, so scan.py at its defaults judges exactly as the calibration
was measured; a single note at the start names every setting that differs from the calibration's (its
false-positive rate may not hold then). A calibration for another kind of score (plain vs smoothed, another σ)
is not used; one made under another rule (before evaluate.py recorded rules) is refused with one line.

Output: one line per image on stdout (--json: one JSON object per line, with "path", "verdict"
(stamped|clean|abstain|error), "score", "threshold", "calibrated", "calibration_differs" (the names of the
settings that differ from the calibration's, only when some do), for a smoothed scanner "votes", "n_used",
"margin" and "seed", with --certify "certified" (the verdict it certifies, "stamped" or "clean", or false),
"radius" and "certificate" (what it means), "error" for a file that could not be read), a progress bar for
folders, and a summary on stderr. Unreadable files are reported and the batch goes on. Exit status: 0 when
every file was read, 1 when some could not be, 2 for bad flags or a bad model.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

from tqdm import tqdm

from engine.cli import HelpFormatter, non_negative_int, positive_float, positive_int, significance
from product.files import expand_inputs, report_failures
from product.scanning import (PLAIN_SCORE, RULE, SMOOTHED_SCORE, PhotoScanner, calibration_differences,  # noqa: F401
                              resolve_rule, smoothed_verdict)
from product.stamping import DEFAULT_WORKING_SIZE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scan.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and folders (searched recursively)")
    p.add_argument("--model", required=True,
                   help="a model folder (holding config.json, e.g. pretrained_models/rs_aug) or a run folder "
                        "(results/RUN, holding model/)")
    p.add_argument("--working_size", type=non_negative_int, default=DEFAULT_WORKING_SIZE,
                   help="long side in pixels at which photos are scanned; must be stamp.py's (0 = native)")
    p.add_argument("--threshold", type=_finite_float, default=None,
                   help="STAMPED when score > THRESHOLD (a plain scanner: a logit margin; a smoothed one: a vote "
                        "share strictly between 0 and 1); if not given, MODEL/calibration.json's, else 0 for a "
                        "plain scanner and ½ for a smoothed one")
    p.add_argument("--json", action="store_true", help="one JSON object per line on stdout instead of text")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    s = p.add_argument_group("randomized smoothing")
    how = s.add_mutually_exclusive_group()
    how.add_argument("--sigma", type=positive_float, default=None,
                     help="judge smoothed with this noise σ in [0,1] pixel units (default: the model's own, from "
                          "its config.json or the run's --std)")
    how.add_argument("--plain", action="store_true", help="judge by the plain scanner even if the model has a σ")
    s.add_argument("--margin", type=_finite_float, default=None,
                   help="a noisy copy votes stamped when the scanner's logit margin logit(stamped) − logit(clean) "
                        "on it is above MARGIN (default: the calibration's, else 0: the scanner's argmax)")
    s.add_argument("--n", type=positive_int, default=None,
                   help="noise samples per image for the smoothed verdict (the most, with --sequential on), and "
                        "CERTIFY's estimation samples (default: the calibration's, else 1000)")
    s.add_argument("--sequential", choices=("on", "off"), default=None,
                   help="on: sequential PREDICT: look at the votes after 16, 64, 256, … copies "
                        "(a first look of 32 or more when the threshold is far from ½) and stop at the first "
                        "decisive look, with the same bound alpha on a wrong verdict (docs/smoothing.md); "
                        "off: always draw --n copies (Cohen's PREDICT) (default: the calibration's, else on)")
    s.add_argument("--alpha", type=significance, default=None,
                   help="significance level of verdicts and certificates (default: the calibration's, else 0.001)")
    s.add_argument("--certify", action="store_true",
                   help="also certify each verdict: the L2 radius (in [0,1] pixel units) within which it holds, "
                        "with confidence 1 − alpha; costs n more passes")
    s.add_argument("--n0", type=positive_int, default=100,
                   help="not used: Cohen's CERTIFY draws n0 copies to choose the class to certify; scan.py "
                        "certifies its verdict instead (kept so that old command lines still run)")
    s.add_argument("--batch_size", type=positive_int, default=200, help="noisy copies classified at once")
    s.add_argument("--seed", type=int, default=None,
                   help="seed of the noise, for a repeatable run (default: drawn from the operating system, printed "
                        "and recorded in the JSON)")
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
    t = scanner.rule
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
