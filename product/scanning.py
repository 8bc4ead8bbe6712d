"""Judging a photo as scan.py does: the scanner, the decision rule, its calibration and certificates.

scan.py (the command) and the product stage of evaluate.py (product.stage) both judge through `PhotoScanner`, so a
figure measured by the stage is what scan.py says about a file.

The rule (RULE, recorded in every calibration.json that evaluate.py writes; docs/usage.md):

- a plain scanner: the score is the logit margin logit(stamped) − logit(clean); STAMPED when score > threshold.
- a smoothed scanner (trained with --std): the base classifier is "margin > m" (m, the calibrated margin; 0 is the
  scanner's argmax); the score is the share of noisy copies x + N(0, σ²) it reads as stamped; the verdict is
  sequential PREDICT against the vote-share threshold t (½ unless --threshold), with at most n copies and error
  bound alpha, ABSTAIN when the copies cannot tell the share from t. Calibrating m instead of t keeps t at ½,
  where the first look (16 copies) decides a lopsided vote: a threshold of 0.945 on the share needs 256 copies
  before any verdict. A certificate (--certify) is Cohen et al.'s for this base classifier: any base classifier
  may be smoothed, so the radius holds for the verdict scan.py gives.
"""
from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.stats import binomtest
from torch import nn

from engine.device import pick_device
from models import STAMPED
from models.io import CALIBRATION_NAME
from report.judge import Judge
from smoothing import ABSTAIN, Smooth
from smoothing.core import threshold_radius
from smoothing.sequential import look_schedule

from .files import pixels_to_tensor, read_pixels
from .stamping import DEFAULT_WORKING_SIZE, fit_pixels, fit_text, load_model, to_working

#: evaluate.py's names for the two kinds of score (report "calibration" → "score"); a calibration is used only
#: for the kind of score it was made on.
PLAIN_SCORE = "logit(stamped) − logit(clean)"
SMOOTHED_SCORE = "fraction of noisy samples read as stamped"
VERDICTS = {STAMPED: "stamped", 1 - STAMPED: "clean", ABSTAIN: "abstain"}
#: The decision rule scan.py applies, as calibration.json names it; a calibration made under any other rule (or
#: before rules were recorded) is refused: its false-positive rate was measured for verdicts scan.py does not give.
RULE = "scan.py rule 2: plain margin > threshold; smoothed: sequential PREDICT on the votes of 'margin > m'"
#: scan.py's settings when neither a flag nor the model's calibration gives them.
DEFAULT_N, DEFAULT_ALPHA = 1000, 0.001


class MarginScanner(nn.Module):
    """The base classifier "logit margin > m": the scanner's logits with `margin` taken off the stamped logit, so
    that the argmax is STAMPED exactly when logit(stamped) − logit(clean) > margin. Smoothing and certifying it
    need nothing else (any base classifier can be smoothed)."""

    def __init__(self, scanner: nn.Module, margin: float):
        super().__init__()
        self.scanner, self.margin = scanner, float(margin)
        self.input_size = getattr(scanner, "input_size", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.scanner(x)
        shift = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
        shift[STAMPED] = self.margin
        return logits - shift


@dataclass
class ScanSettings:
    """How PhotoScanner judges (scan.py's flags; None: the model's calibration's value, else the default)."""

    model: str
    working_size: int = DEFAULT_WORKING_SIZE
    threshold: float | None = None
    margin: float | None = None
    device: str = "auto"
    sigma: float | None = None
    plain: bool = False
    n: int | None = None
    sequential: str | None = None  # "on" / "off"
    alpha: float | None = None
    certify: bool = False
    batch_size: int = 200
    seed: int | None = None


@dataclass
class Rule:
    """The decision rule in force: the threshold (STAMPED iff score > value), the margin m of a smoothed scanner's
    base classifier, and where they came from."""

    value: float
    margin: float
    source: str  # "flag", "calibration" or "default"
    text: str  # how a verdict line names it, e.g. "calibrated, FPR ≤ 1%"
    calibration: dict | None = None
    path: Path | None = None  # the calibration.json it came from
    differs: list[str] = field(default_factory=list)  # settings unlike the calibration's (calibration_differences)

    @property
    def calibrated(self) -> bool:
        return self.source == "calibration"


def read_calibration(path: Path) -> dict:
    """MODEL/calibration.json → its record; ValueError (one line) when it is unreadable or made under a rule other
    than scan.py's RULE."""
    try:
        cal = json.loads(path.read_text())
        float(cal["threshold"]), cal["score"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a calibration written by evaluate.py --write_calibration ({e})") from None
    if cal.get("rule") != RULE:
        raise ValueError(f"{path}: made under another decision rule than scan.py's (its verdicts were "
                         f"{cal.get('rule') or 'judged before rules were recorded'}), so its false-positive rate does "
                         f"not hold for scan.py; recalibrate (evaluate.py --write_calibration) or pass --threshold")
    return cal


def resolve_rule(given: float | None, given_margin: float | None, model_dir: Path, sigma: float | None,
                 log=print, use_calibration: bool = True) -> Rule:
    """--threshold/--margin, else MODEL/calibration.json when made for this kind of score (and use_calibration),
    else the defaults.

    A smoothed scanner's threshold is a vote share: 0 and 1 are refused (no test can decide against them)."""
    score = SMOOTHED_SCORE if sigma is not None else PLAIN_SCORE
    default = 0.5 if sigma is not None else 0.0
    if given is not None and sigma is not None and not 0 < given < 1:
        raise ValueError(f"--threshold {given:g}: a smoothed scanner's score is a share of votes, and only a "
                         f"threshold strictly between 0 and 1 can be tested; give one in (0, 1)")
    if given_margin is not None and sigma is None:
        raise ValueError("--margin: applies to a smoothed scanner's base classifier only; a plain scanner's "
                         "threshold is already a margin (--threshold)")
    cal, path = None, model_dir / CALIBRATION_NAME
    if given is None and use_calibration and path.is_file():
        made = read_calibration(path)
        made_for, made_sigma = made["score"], made.get("sigma")
        if made_for != score or (sigma is not None and (made_sigma is None or not math.isclose(made_sigma, sigma))):
            was = f"{made_for!r}" + (f" at σ {made_sigma:g}" if made_sigma is not None else "")
            now = f"{score!r}" + (f" at σ {sigma:g}" if sigma is not None else "")
            log(f"note: {path} calibrates {was}, not {now}: using the uncalibrated threshold {default:g}")
        else:
            cal = made
    margin = given_margin if given_margin is not None else float((cal or {}).get("margin") or 0.0)
    if cal is None:
        if given is not None:
            return Rule(given, margin, "flag", "--threshold")
        return Rule(default, margin, "default" if given_margin is None else "flag",
                    "uncalibrated" if given_margin is None else "--margin")
    target = f"FPR ≤ {100 * cal.get('target_fpr', float('nan')):g}%"
    if given_margin is not None:
        text = f"--margin {given_margin:g}, not the calibrated margin: the calibrated {target} does not apply"
        return Rule(float(cal["threshold"]), margin, "flag", text)
    text = f"calibrated, {target}" if cal.get("backed", False) else \
        f"calibrated on {cal.get('n_clean', '?')} clean photos, too few to back {target}"
    return Rule(float(cal["threshold"]), margin, "calibration", text, cal, path)


def _resolution(kind: str, size: int) -> str:
    """How a note names a resolution: ("working", 0) native, ("working", W), ("fitted", F)."""
    if kind == "fitted":
        return f"on photos fitted to {size}×{size}"
    return f"at working size {size}" if size else "at native resolution"


def calibration_resolution(cal: dict) -> tuple[str, int]:
    """The resolution a calibration.json was measured at: ("fitted", F) for a fixed-input network, else
    ("working", W) (0 = native)."""
    if cal.get("fitted_to") is not None:
        return "fitted", int(cal["fitted_to"])
    return "working", int(cal.get("working_size") or 0)


def calibration_differences(cal: dict, settings: dict, resolution: tuple[str, int]) -> list[tuple[str, str, str]]:
    """The settings under which scan.py judges that differ from those its calibration was measured under.

    `settings`: scan.py's {"n", "alpha", "sequential"} (a smoothed scanner; {} for a plain one), compared with the
    calibration's own; `resolution`: ("working", --working_size) or ("fitted", F), compared with
    calibration_resolution(cal). The vote's spread, hence the share of clean photos flagged, depends on each.

    Returns:
        [(name, calibration's value, scan.py's value)], values as a note words them; [] when all match.
    """
    differs = []
    def shown(name, value):
        return f"sequential {'on' if value else 'off'}" if name == "sequential" else f"{name} {value:g}"

    for name, value in settings.items():
        made = cal.get(name)
        if made is not None and made != value:
            differs.append((name, shown(name, made), shown(name, value)))
    made_at = calibration_resolution(cal)
    if made_at != resolution:
        differs.append(("working_size", _resolution(*made_at), _resolution(*resolution)))
    return differs


def differences_note(path: Path, differs: list[tuple[str, str, str]]) -> str:
    """One line naming every differing setting (calibration_differences), the calibration's value vs scan.py's."""
    made = ", ".join(c for _, c, _ in differs)
    ours = ", ".join(s for _, _, s in differs)
    return f"note: {path} was made with {made}; scan.py judges with {ours}: the calibrated false-positive rate may " \
           f"not hold"


def smoothed_verdict(votes: int, n: int, threshold: float, alpha: float) -> int:
    """STAMPED if the share votes/n of noisy copies read as stamped is above `threshold` (in (0, 1)), CLEAN if not,
    ABSTAIN when a two-sided binomial test cannot tell the share from the threshold at level alpha. At
    threshold ½ this is Smooth.decide (PREDICT) for two classes."""
    if not 0 < threshold < 1:
        raise ValueError(f"smoothed_verdict: threshold must lie strictly between 0 and 1, got {threshold}")
    if binomtest(votes, n, p=threshold).pvalue > alpha:
        return ABSTAIN
    return STAMPED if votes / n > threshold else 1 - STAMPED


def _fmt(score: float, smoothed: bool) -> str:
    return f"{score:.3f}" if smoothed else f"{score:.3g}"


def draw_seed(seed: int | None, bits: int = 63) -> int:
    """`seed`, or a fresh `bits`-bit one from the operating system: noise that whoever reads the code cannot
    predict (the 1 − alpha guarantees assume noise independent of the photo)."""
    return secrets.randbits(bits) if seed is None else int(seed)


class PhotoScanner:
    """Judges one image at a time as scan.py does: (path) or (pixels) → a result dict (what --json prints).

    Attributes read by the product stage: `encoder` (None for a scanner-only folder), `sigma`, `rule`, `n`,
    `alpha`, `sequential`, `seed`, `fit`, `model_dir`."""

    def __init__(self, settings, log=print, loaded=None, calibration: bool = True):
        """settings: a ScanSettings or scan.py's parsed args (the same attributes). loaded: load_model's result to
        reuse, else the model is loaded here. calibration: False ignores MODEL/calibration.json (the product stage
        that makes a new one sets its rule with set_rule)."""
        self.settings = s = settings
        self.device = pick_device(s.device)
        self.model_dir, run_dir, run_args, self.encoder, self.scanner, config = (
            loaded or load_model(s.model, self.device))
        self.fit = self.scanner.input_size  # the original's detector (arch 'deepraft') takes 400×400 only
        if s.plain:
            self.sigma = None
        elif s.sigma is not None:
            self.sigma = s.sigma
        else:
            trained = config.get("sigma", run_args.get("std"))
            self.sigma = float(trained) if trained is not None else None
        if s.certify and self.sigma is None:
            raise ValueError("--certify needs a smoothed scanner: this model was not trained with --std; pass "
                             "--sigma to smooth it anyway")
        self.seed = draw_seed(s.seed)
        # on the device, as certify.py and evaluate.py draw theirs: no noise made on the CPU and copied over. Made
        # once: a new rule (the product stage's calibration) goes on drawing fresh noise, never repeating the copies
        # its calibration scored.
        self.sequential_generator = torch.Generator(device=self.device).manual_seed(self.seed)
        self.certify_generator = torch.Generator(device=self.device).manual_seed((self.seed + 1) % 2 ** 63)
        self.set_rule(resolve_rule(s.threshold, s.margin, self.model_dir, self.sigma, log, calibration), log)

    def set_rule(self, rule: Rule, log=print) -> None:
        """Judge by `rule` from now on; n, alpha and sequential come from the flags, else its calibration."""
        s, cal = self.settings, rule.calibration or {}
        self.rule = rule
        self.n = s.n if s.n is not None else int(cal.get("n") or DEFAULT_N)
        self.alpha = s.alpha if s.alpha is not None else float(cal.get("alpha") or DEFAULT_ALPHA)
        on = s.sequential if s.sequential is not None else ("on" if cal.get("sequential", True) else "off")
        self.sequential = self.sigma is not None and on == "on"
        base = MarginScanner(self.scanner, rule.margin) if self.sigma is not None and rule.margin else self.scanner
        self.judge = Judge(base, self.sigma, n=self.n, alpha=self.alpha, batch_size=s.batch_size, seed=self.seed,
                           sequential=False)
        self.smooth = Smooth(base, self.sigma) if self.sigma is not None else None
        rule.differs = []
        if rule.calibration is not None:  # a calibration.json in use (not one being made by the product stage)
            resolution = ("fitted", self.fit) if self.fit else ("working", s.working_size)
            mine = {"n": self.n, "alpha": self.alpha, "sequential": self.sequential} if self.sigma is not None else {}
            differs = calibration_differences(rule.calibration, mine, resolution)
            if differs:
                log(differences_note(rule.path, differs))
            rule.differs = [name for name, _, _ in differs]

    def describe(self) -> str:
        s, t = self.settings, self.rule
        if self.fit:
            size = fit_text(self.fit)
        else:
            size = "working resolution " + (f"long side {s.working_size} px" if s.working_size
                                            else "native resolution")
        extra = (f"; certifying each verdict with n {self.n} fresh noisy copies, alpha {self.alpha:g}"
                 if s.certify else "")
        if self.sigma is None:
            judge = "plain scanner: logit margin"
        else:
            base = f"copies whose logit margin > {t.margin:.4g}" if t.margin else "the scanner's argmax"
            how = "PREDICT"
            if self.sequential:
                how = (f"sequential PREDICT (stops at the first decisive look of "
                       f"{', '.join(map(str, look_schedule(self.n, t.value, self.alpha)))} copies)")
            judge = f"smoothed scanner: {how} on the votes of {base}, σ {self.sigma}, n {self.n}, alpha {self.alpha}"
        return (f"{self.model_dir}: {judge}{extra}; STAMPED when score > {t.value:.4g} ({t.text}); {size}; "
                f"noise seed {self.seed}")

    def prepare(self, pixels: np.ndarray) -> torch.Tensor:
        """(H,W,3) uint8 → (1,3,h,w) in [0,1] at the resolution it is judged at (working size, or fitted)."""
        if self.fit:
            return pixels_to_tensor(fit_pixels(pixels, self.fit), self.device)
        return to_working(pixels_to_tensor(pixels, self.device), self.settings.working_size)

    def __call__(self, path: Path) -> dict:
        return {"path": str(path), **self.judge_pixels(read_pixels(path))}  # ImageReadError for a bad file

    def judge_pixels(self, pixels: np.ndarray) -> dict:
        """One decoded image (H,W,3) uint8 → its result: verdict, score, threshold, … (and the certificate)."""
        x = self.prepare(pixels)
        verdict, score, n_used = self.judge_tensor(x)
        t = self.rule.value
        result = {"verdict": VERDICTS[verdict], "score": score, "threshold": t,
                  "calibrated": self.rule.calibrated, "threshold_source": self.rule.source,
                  "size": [pixels.shape[1], pixels.shape[0]], "scanned_at": [x.shape[-1], x.shape[-2]]}
        if self.rule.differs:
            result["calibration_differs"] = list(self.rule.differs)
        if self.sigma is not None:
            result.update(votes=round(score * n_used), n_used=n_used, n=self.n, sigma=self.sigma,
                          margin=self.rule.margin, seed=self.seed)
        if self.settings.certify:
            result.update(self.certify(x[0], verdict, t))
        return result

    def judge_tensor(self, x: torch.Tensor) -> tuple[int, float, int]:
        """One image (1,3,H,W) in [0,1], at the resolution it is judged at → (verdict: STAMPED, CLEAN or ABSTAIN,
        score, noisy copies used: n, fewer when sequential PREDICT stopped early, unused for a plain scanner)."""
        t = self.rule.value
        x = x.contiguous(memory_format=torch.channels_last)
        if self.sequential:
            verdicts, votes, used = self.smooth.predict_sequential(
                x, self.n, self.alpha, self.settings.batch_size, self.sequential_generator, threshold=t,
                positive=STAMPED)
            return int(verdicts[0]), int(votes[0]) / int(used[0]), int(used[0])
        verdicts, scores = self.judge(x)
        score = float(scores[0])
        if self.sigma is None:
            return (STAMPED if score > t else 1 - STAMPED), score, self.n
        return smoothed_verdict(round(score * self.n), self.n, t, self.alpha), score, self.n

    def noisy_margins(self, x: torch.Tensor, copies: int) -> torch.Tensor:
        """The scanner's logit margins on `copies` noisy copies of one image x (1,3,H,W) → (copies,) float32 CPU:
        the calibration's raw material (the base classifier "margin > m" votes stamped on the copies above m)."""
        logits = Smooth(self.scanner, self.sigma).noisy_logits(x, copies, self.settings.batch_size,
                                                               self.sequential_generator)
        return logits[:, STAMPED] - logits[:, 1 - STAMPED]

    def certify(self, x: torch.Tensor, verdict: int, threshold: float) -> dict:
        """The certificate of a smoothed verdict → {"certified", "radius", "certificate", ...} for the result.

        The verdict chose the side ("P(stamped) > threshold" or "≤") from its own noise, so n fresh noisy copies,
        drawn with another generator, bound that side's probability (one-sided Clopper–Pearson at alpha), and
        threshold_radius turns the bound into the radius. "certified" is the verdict certified ("stamped" or
        "clean"), or False with radius 0 when the bound does not clear the threshold or the verdict abstains (no
        fresh copies are drawn then).
        """
        n, alpha = self.n, self.alpha
        if verdict == ABSTAIN:
            return {"certified": False, "radius": 0.0,
                    "certificate": "none: the verdict abstains, so there is no verdict to certify"}
        counts = self.smooth.counts(x, n, self.settings.batch_size, self.certify_generator)
        votes = int(counts[STAMPED])
        above = verdict == STAMPED
        radius = threshold_radius(votes, n, threshold, self.sigma, alpha, above=above)
        name, side = VERDICTS[verdict], ("P(stamped) > " if above else "P(stamped) ≤ ") + f"{threshold:.4g}"
        record = {"certify_votes": votes, "certify_n": n}
        if radius <= 0:
            share = "lower" if above else "upper"
            return {**record, "certified": False, "radius": 0.0,
                    "certificate": f"none: the {share} confidence bound on P(stamped) from {votes} of {n} fresh "
                                   f"votes does not clear the threshold {threshold:.4g} at alpha {alpha:g}"}
        meaning = (f"the {name} verdict ({side}) holds for every L2 perturbation of norm < {radius:.4g} "
                   f"([0,1] pixel units at the resolution scanned; confidence 1 − {alpha:g})")
        return {**record, "certified": name, "radius": radius, "certificate": meaning}

    def line(self, r: dict) -> str:
        """The human-readable verdict line of a result."""
        if r["verdict"] == "error":
            return f"{r['path']}: ERROR {r['error']}"
        smoothed = self.sigma is not None
        score, t = _fmt(r["score"], smoothed), _fmt(r["threshold"], smoothed)
        how = self.rule.text
        if r["verdict"] == "abstain":
            text = (f"{r['path']}: ABSTAIN score {score}: {r['votes']} of {r['n_used']} votes cannot be told from "
                    f"threshold {t} at alpha {self.alpha:g} ({how})")
        else:
            sign = ">" if r["verdict"] == "stamped" else "≤"
            text = f"{r['path']}: {r['verdict'].upper()} score {score} {sign} threshold {t} ({how})"
        if "certificate" in r:
            text += (f"; certified: {r['certificate']}" if r["certified"]
                     else f"; certified: false, radius 0 ({r['certificate']})")
        return text
