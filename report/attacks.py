"""Table 3: the scanner's accuracy under L∞ adversarial attacks, and how often an attacker forges or removes a stamp.

Attacks come from pyautoattack (the reference AutoAttack code) in its `custom` version: its DLR-loss attacks need
three or more classes and crash on the 2-logit scanner, so we run APGD-CE (white box: gradients) and Square
(black box: score queries only) ourselves, with the paper's settings made explicit (`AttackSettings`).

Rows of the table (`robustness_table`):

- plain scanner, judged by the argmax of its logits:
  - 'apgd-ce': APGD on the cross-entropy, 100 iterations, 1 restart.
  - 'square': Square, 5,000 queries, 1 restart.
  - 'adaptive': both; an image counts as robust only if it survives both (AutoAttack's ensemble rule).
    Without noise there is nothing to take an expectation over, so this is APGD-CE then Square.
- smoothed scanner (`sigma` given), judged by its smoothed prediction `Smooth.predict` (Cohen's PREDICT), never
  by one noisy pass; an abstention counts as wrong (a platform must act on every photo):
  - 'apgd-ce', 'square': the same attacks on the base scanner without noise: an attacker who ignores the
    smoothing. Square is run on the base scanner too, not on `NoisyScanner`: its random search keeps a
    candidate when one query scores better than the best so far, and with a noisy model that best is the
    luckiest draw yet, which later candidates rarely beat; the base scanner's scores are the black-box
    signal worth searching.
  - 'apgd-eot': APGD-CE on `NoisyScanner` with expectation over transformation: each step's gradient is the
    mean over `eot_iter` noise draws (AutoAttack's `rand` version uses 20), i.e. a step on the expected loss
    of the smoothed classifier.
  - 'adaptive': 'apgd-eot' then 'square': robust only if the image survives both.
  pyautoattack picks the images to attack, and keeps a result, by a majority vote over `vote_n` noise draws
  (`NoisyScanner.votes`): an estimate of the smoothed prediction, where one noisy pass would throw away many
  successful adversarial examples. The verdict in the table is Smooth.predict's on what it returns.

Only images judged right without attack are attacked (the others count as wrong at every ε). The attacks
themselves skip an image their own model already gets wrong: for 'apgd-ce' and 'square' on a smoothed
scanner, an image the base scanner gets wrong without noise but the smoothed scanner gets right is left as it
is (rare for a scanner trained on clean images too).

Every row is monotone in ε by construction: the ε-balls are nested, so an image the attack has already turned
at a smaller ε is counted as turned at every larger ε (and is not attacked again). For a smoothed scanner an
image that merely abstained is attacked again at the next ε, and keeps the worse of the two verdicts
(correct < abstain < the other class).

Forgery and removal: with two classes the untargeted attack on a clean image is exactly the targeted attack
"make it scan as STAMPED". `forgery_success` = among clean images read as CLEAN without attack, the fraction
read as STAMPED after the attack; `removal_success` = among stamped images read as STAMPED, the fraction read
as CLEAN after. An abstention is neither (it is counted in "abstain").

pyautoattack quirks handled here:
- `AutoAttack(version='custom')` leaves APGD at 5 restarts and sets its step-size schedule (checkpoints at
  22%/6%/3% of the iterations) from `n_iter` in the constructor, so setting `aa.apgd.n_iter` afterwards leaves
  the schedule of 100 iterations. We build the APGD object again with our iterations, restarts and EOT.
- Its attacks reseed torch's global generator (`torch.random.manual_seed(seed)`) on every call; `attack`
  saves and restores the caller's generator states, and seeds them itself first, so a result depends only on
  the inputs and `settings.seed`.
- `run_standard_evaluation` decides which images to attack and which results to keep with one forward pass of
  its `get_logits`; `attack(judge=...)` replaces that pass (with the vote, for a smoothed scanner).
- Its sanity checks log warnings (to the logger `report.attacks.pyautoattack`); the "randomized defense" one
  is expected for the vote and is dropped. Its check for "dynamic defenses" calls `sys.settrace(None)`, which
  would switch off a debugger's or coverage's tracer; `attack` puts the caller's tracer back.
"""
from __future__ import annotations

import itertools
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from pyautoattack import AutoAttack
from pyautoattack.autopgd_base import APGDAttack
from torch import nn

from engine.device import rng_state, set_rng_state
from models import CLEAN, STAMPED
from smoothing import ABSTAIN

from .judge import Judge, eval_mode

#: what `attack` can run: APGD on the cross-entropy (one gradient per step), the same with the gradient
#: averaged over `eot_iter` forward passes (for a randomized model), and Square
ATTACKS = ("apgd-ce", "apgd-eot", "square")

#: pyautoattack's own log messages (sanity checks); propagate to the root logger as usual
_AA_LOGGER = logging.getLogger(__name__ + ".pyautoattack")
_AA_LOGGER.addFilter(lambda record: "randomized defense" not in record.getMessage())


@dataclass
class AttackSettings:
    """How hard to attack and how to judge; the defaults are the paper's (AutoAttack's standard settings).

    eps: L∞ radii in [0,1] pixel units (the paper: 2, 4, 8, 16 and 32 /255).
    apgd_iters: APGD iterations per restart.
    square_queries: Square queries per restart.
    n_restarts: restarts of APGD and of Square (AutoAttack standard: 1).
    eot_iter: noise draws averaged per APGD gradient in 'apgd-eot' (AutoAttack's rand version: 20).
    vote_n: noise draws of the majority vote with which pyautoattack picks the images to attack and keeps
        the successful ones, for a smoothed scanner (odd, so that votes do not tie).
    smooth_n, smooth_alpha: samples and significance level of `Smooth.predict`, the verdict on a smoothed
        scanner.
    noise_batch: noisy copies `Smooth.predict` classifies at once (the memory knob of the smoothed verdict).
    batch_size: images attacked at once.
    seed: seeds every random draw (attack initialisations, Square's squares, noise).
    """

    eps: tuple[float, ...] = (2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255)
    apgd_iters: int = 100
    square_queries: int = 5000
    n_restarts: int = 1
    eot_iter: int = 20
    vote_n: int = 25
    smooth_n: int = 1000
    smooth_alpha: float = 0.001
    noise_batch: int = 250
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self):
        self.eps = tuple(float(e) for e in self.eps)
        if not self.eps or not all(0.0 <= e <= 1.0 for e in self.eps):
            raise ValueError(f"AttackSettings: eps must be a non-empty list of radii in [0, 1], got {self.eps}")
        for name in ("apgd_iters", "square_queries", "n_restarts", "eot_iter", "vote_n", "smooth_n",
                     "noise_batch", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AttackSettings: {name} must be an integer ≥ 1, got {value!r}")
        if not 0.0 < self.smooth_alpha < 1.0:
            raise ValueError(f"AttackSettings: smooth_alpha must be in (0, 1), got {self.smooth_alpha}")

    @classmethod
    def quick(cls, **overrides) -> "AttackSettings":
        """Few iterations, queries and samples: seconds at 64² on CPU. For smoke runs, never for the table."""
        values = dict(apgd_iters=10, square_queries=100, eot_iter=2, vote_n=5, smooth_n=100, noise_batch=100)
        return cls(**{**values, **overrides})


def eps_label(eps: float) -> str:
    """A radius as the table writes it: 8/255 → '8/255'."""
    return f"{eps * 255:g}/255"


def _device(module: nn.Module) -> torch.device:
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


class NoisyScanner(nn.Module):
    """The randomized model that EOT attacks: x (B,3,H,W) → scanner(x + σ·ε) logits (B,2), ε ~ N(0, I) drawn
    fresh on every call from torch's global generator (of x's device).

    The noise is not clamped, as in training (smoothing.noise) and in `Smooth`. Gradients flow to x.
    """

    def __init__(self, scanner: nn.Module, sigma: float):
        super().__init__()
        sigma = float(sigma)
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"NoisyScanner: sigma must be a finite noise standard deviation > 0, got {sigma}")
        self.scanner = scanner
        self.sigma = sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scanner(x + self.sigma * torch.randn_like(x))

    @torch.no_grad()
    def votes(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """How many of n noisy passes pick each class: (B,3,H,W) → float counts (B,2), one noisy copy of the
        batch in memory at a time. Their argmax is a cheap Monte Carlo estimate of the smoothed prediction."""
        counts = None
        for _ in range(n):
            logits = self(x)
            hits = nn.functional.one_hot(logits.argmax(1), logits.shape[1]).float()
            counts = hits if counts is None else counts + hits
        return counts


def attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, name: str,
           settings: AttackSettings | None = None, *,
           judge: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Run one pyautoattack attack (version='custom') and return the adversarial images.

    Args:
        model: images (B,3,H,W) in [0,1] → logits (B,C); run in eval mode (restored afterwards), on the device
            of its first parameter or buffer.
        x: images (N,3,H,W) in [0,1], on any device. y: their true labels (N,) (0 clean, 1 stamped).
        eps: L∞ radius in [0,1] pixel units; 0 returns a copy of x without running anything.
        name: 'apgd-ce', 'apgd-eot' (APGD-CE with the gradient averaged over `settings.eot_iter` passes of a
            randomized model) or 'square'.
        settings: iterations, queries, restarts, EOT, batch size and seed (default: the paper's).
        judge: what pyautoattack asks "is this image classified as y?": images → scores (B,C) whose argmax is
            the class. It attacks only the images the judge gets right and keeps an attack's result only where
            the judge then gets it wrong; elsewhere x_adv = x. Default: `model` itself.

    Returns:
        x_adv (N,3,H,W) on x's device: within eps of x in L∞, in [0,1].

    The caller's random generator states are left as they were; the result depends only on the inputs and
    settings.seed.
    """
    settings = settings or AttackSettings()
    if name not in ATTACKS:
        raise ValueError(f"attack: unknown attack {name!r}; choose one of {list(ATTACKS)}")
    eps = float(eps)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"attack: eps must be an L∞ radius in [0, 1] pixel units, got {eps}")
    _check_images("attack: x", x)
    if y.shape != (x.shape[0],):
        raise ValueError(f"attack: y must hold one label per image, shape ({x.shape[0]},), got {tuple(y.shape)}")
    if eps == 0 or x.shape[0] == 0:
        return x.clone()

    device = _device(model)
    aa = AutoAttack(model, norm="Linf", eps=eps, version="custom",
                    attacks=["square" if name == "square" else "apgd-ce"], device=device, seed=settings.seed)
    aa.verbose = False
    aa.logger = _AA_LOGGER
    # Rebuilt rather than edited: APGD derives its step-size schedule from n_iter in its constructor.
    aa.apgd = APGDAttack(aa.model, n_iter=settings.apgd_iters, n_restarts=settings.n_restarts,
                         eot_iter=settings.eot_iter if name == "apgd-eot" else 1, eps=eps, norm="Linf",
                         rho=aa.apgd.thr_decr, seed=settings.seed, device=device, logger=_AA_LOGGER, verbose=False)
    aa.square.n_queries = settings.square_queries
    aa.square.n_restarts = settings.n_restarts
    if judge is not None:
        aa.get_logits = judge

    saved_rng, tracer = rng_state(), sys.gettrace()
    try:
        with eval_mode(model):
            torch.manual_seed(settings.seed)
            # y beside x: pyautoattack indexes both with indices on x's device
            x_adv, _ = aa.run_standard_evaluation(x.detach().float(), y.detach().long().to(x.device),
                                                  batch_size=settings.batch_size)
    finally:
        set_rng_state(saved_rng)
        sys.settrace(tracer)
    return x_adv.to(x.dtype)


def _check_images(what: str, x: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{what} must be images (N,3,H,W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{what} must be floating-point images in [0,1], got dtype {x.dtype}")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"{what} must lie in [0,1], got values in [{float(x.min()):.3g}, {float(x.max()):.3g}]")


# ---------------------------------------------------------------------------------------------- the table
def _rank(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """0 correct, 1 abstained, 2 the other class: how badly an attack has gone for the scanner."""
    return torch.where(pred == y, 0, torch.where(pred == ABSTAIN, 1, 2))


def _fraction(k, n):
    return float(k) / n if n else None


def _accuracies(pred: torch.Tensor, y: torch.Tensor) -> dict:
    clean, stamped = y == CLEAN, y == STAMPED
    return {
        "acc_clean": _fraction((pred[clean] == CLEAN).sum(), int(clean.sum())),
        "acc_stamped": _fraction((pred[stamped] == STAMPED).sum(), int(stamped.sum())),
        "acc": _fraction((pred == y).sum(), len(y)),
        "abstain": _fraction((pred == ABSTAIN).sum(), len(y)),
        "abstain_clean": _fraction((pred[clean] == ABSTAIN).sum(), int(clean.sum())),
        "abstain_stamped": _fraction((pred[stamped] == ABSTAIN).sum(), int(stamped.sum())),
    }


def _row(pred: torch.Tensor, y: torch.Tensor, before: torch.Tensor, eps: float, seconds: float) -> dict:
    forgery_targets = (y == CLEAN) & (before == CLEAN)
    removal_targets = (y == STAMPED) & (before == STAMPED)
    n_forged = int((forgery_targets & (pred == STAMPED)).sum())
    n_removed = int((removal_targets & (pred == CLEAN)).sum())
    return {"eps": eps, **_accuracies(pred, y),
            "forgery_success": _fraction(n_forged, int(forgery_targets.sum())), "n_forged": n_forged,
            "removal_success": _fraction(n_removed, int(removal_targets.sum())), "n_removed": n_removed,
            "seconds": seconds}


def _attack_over_eps(model: nn.Module, name: str, x: torch.Tensor, y: torch.Tensor, before: torch.Tensor,
                     verdict: Judge, settings: AttackSettings, judge, log) -> dict[float, tuple]:
    """eps → (verdicts (N,), seconds) for one attack, ε ascending, each verdict the worst found at ≤ ε."""
    pred = before.clone()
    out = {}
    for eps in sorted(set(settings.eps)):
        start = time.perf_counter()
        todo = ((before == y) & (_rank(pred, y) < 2)).nonzero().squeeze(1)
        if eps > 0 and len(todo):
            x_adv = attack(model, x[todo], y[todo], eps, name, settings, judge=judge)
            new = before[todo].clone()
            changed = (x_adv != x[todo]).flatten(1).any(1).cpu()
            if changed.any():  # an unchanged image keeps its verdict without attack (no fresh noise draw)
                new[changed] = verdict(x_adv[changed.to(x_adv.device)])[0]
            worse = _rank(new, y[todo]) > _rank(pred[todo], y[todo])
            pred[todo[worse]] = new[worse]
        out[eps] = (pred.clone(), time.perf_counter() - start)
        if log is not None:
            acc = float((pred == y).float().mean())
            log(f"{name} ε {eps_label(eps)}: accuracy {acc:.2%} ({len(todo)} attacked, "
                f"{out[eps][1]:.1f} s)")
    return out


def robustness_table(scanner: nn.Module, clean: torch.Tensor, stamped: torch.Tensor,
                     settings: AttackSettings | None = None, *, sigma: float | None = None,
                     log: Callable[[str], None] | None = None) -> dict:
    """Table 3 for one scanner: accuracy under each attack at each ε, with forgery and removal success.

    Args:
        scanner: the base scanner, (B,3,H,W) in [0,1] → logits (B,2); evaluated in eval mode (restored after).
        clean: clean images (N,3,H,W) in [0,1]; stamped: stamped images (M,3,H,W) in [0,1]; any device.
        settings: attacks and verdict (default: the paper's; `AttackSettings.quick()` for smoke runs).
        sigma: None judges the plain scanner by its argmax; a σ judges the smoothed scanner by Smooth.predict
            with that σ (in [0,1] pixel units; the σ it was trained with) and adds the EOT attack.
        log: called with one progress line per attack and ε (e.g. print); None is silent.

    Returns:
        Plain JSON values (floats, ints, None where a rate has no image to be taken over):
        {"sigma", "settings", "n_clean", "n_stamped",
         "no_attack": {"acc_clean", "acc_stamped", "acc", "abstain", "abstain_clean", "abstain_stamped"},
         "attacks": {attack: {eps_label: {"eps", the same six, "forgery_success", "n_forged",
                                          "removal_success", "n_removed", "seconds"}}}}
        with attacks 'apgd-ce', 'square', 'adaptive' (plain), plus 'apgd-eot' (smoothed); see the module
        docstring for what each is. Accuracies count abstentions as wrong; "abstain" is the fraction of
        images the smoothed scanner abstained on (0 for a plain scanner); "seconds" the wall time of that
        attack at that ε, verdicts included (adaptive: the sum of its two parts).
    """
    settings = settings or AttackSettings()
    _check_images("robustness_table: clean", clean)
    _check_images("robustness_table: stamped", stamped)
    if clean.shape[1:] != stamped.shape[1:]:
        raise ValueError(f"robustness_table: clean and stamped images differ in size: {tuple(clean.shape)} vs "
                         f"{tuple(stamped.shape)}")
    if len(clean) == 0 or len(stamped) == 0:
        raise ValueError("robustness_table: needs at least one clean and one stamped image")
    x = torch.cat([clean, stamped])
    y = torch.cat([torch.full((len(clean),), CLEAN), torch.full((len(stamped),), STAMPED)]).long()

    verdict = Judge(scanner, sigma, n=settings.smooth_n, alpha=settings.smooth_alpha,
                    batch_size=settings.noise_batch if sigma is not None else settings.batch_size, seed=settings.seed)
    before = verdict(x)[0]
    attacks = {}
    if sigma is None:
        runs = {"apgd-ce": (scanner, "apgd-ce"), "square": (scanner, "square")}
        adaptive_from = ("apgd-ce", "square")
        judge = None
    else:
        noisy = NoisyScanner(scanner, sigma)
        runs = {"apgd-ce": (scanner, "apgd-ce"), "square": (scanner, "square"), "apgd-eot": (noisy, "apgd-eot")}
        adaptive_from = ("apgd-eot", "square")
        # Which images pyautoattack attacks, and which of its results it keeps: a vote over noise, not one pass.
        vote_n = settings.vote_n
        judge = lambda images: noisy.votes(images, vote_n)  # noqa: E731
    verdicts = {name: _attack_over_eps(model, kind, x, y, before, verdict, settings, judge, log)
                for name, (model, kind) in runs.items()}
    worst = {}
    for eps in verdicts[adaptive_from[0]]:
        (p1, s1), (p2, s2) = (verdicts[name][eps] for name in adaptive_from)
        worst[eps] = (torch.where(_rank(p2, y) > _rank(p1, y), p2, p1), s1 + s2)
    verdicts["adaptive"] = worst
    for name, by_eps in verdicts.items():
        attacks[name] = {eps_label(eps): _row(pred, y, before, eps, seconds) for eps, (pred, seconds) in by_eps.items()}
    return {
        "sigma": None if sigma is None else float(sigma),
        "settings": {**asdict(settings), "eps": list(settings.eps)},
        "n_clean": len(clean), "n_stamped": len(stamped),
        "no_attack": _accuracies(before, y),
        "attacks": attacks,
    }
