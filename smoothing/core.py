"""Randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019): a smoothed scanner with a certified L2 radius.

The smoothed classifier is g(x) = argmax_c P(f(x + ε) = c), ε ~ N(0, σ²I), where f is the base scanner. g is
estimated by Monte Carlo. PREDICT returns g(x) or abstains; CERTIFY returns g(x) with a radius R such that,
with probability at least 1 - alpha over the sampling, g gives the same class for every x + δ with ‖δ‖₂ < R.

Modelled on locuslab/smoothing `code/core.py`, in current torch and scipy (`binom_test` is gone: `binomtest`;
the Clopper–Pearson bound comes from scipy's beta quantile instead of statsmodels).
"""
from __future__ import annotations

import itertools
import math
import operator

import torch
from scipy.stats import beta, binomtest, norm
from torch import nn

from engine.device import full_precision

from .sequential import sequential_decide

#: Returned instead of a class when the smoothed classifier does not commit to one.
ABSTAIN = -1


def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper–Pearson lower bound on a binomial proportion, from k successes in n trials.

    Equal to the lower end of the two-sided exact interval at level 2·alpha (Cohen's
    `proportion_confint(k, n, alpha=2*alpha, method="beta")[0]`); 0 when k = 0.
    """
    if k == 0:
        return 0.0
    return float(beta.ppf(alpha, k, n - k + 1))


def threshold_radius(votes: int, n: int, threshold: float, sigma: float, alpha: float = 0.001,
                     above: bool = True) -> float:
    """Certified L2 radius of a smoothed decision at any threshold t: "p > t" (above=True) or "p ≤ t" (above=False).

    p(x) = P(f(x + ε) = c), ε ~ N(0, σ²I), is the probability that the base classifier f answers the class c
    (for scan.py: STAMPED), and `votes` of `n` noisy copies, drawn independently of whatever chose the side,
    were c. The radius R is such that, with probability at least 1 - alpha over those n copies, the decision
    holds at every x + δ with ‖δ‖₂ < R (R in the units of σ: [0,1] pixel values).

    Why (Salman et al., NeurIPS 2019, Lemma 2; the core of Cohen et al.'s Theorem 1): for any h: ℝᵈ → [0,1],
    x ↦ Φ⁻¹(E h(x + ε)) is 1/σ-Lipschitz. Applied to h = 1[f = c], and to h = 1[f ≠ c] with q = 1 - p:

        "p > t" holds within R = σ·(Φ⁻¹(p_lower) − Φ⁻¹(t)),        certified when p_lower > t;
        "p ≤ t" holds within R = σ·(Φ⁻¹(t) − Φ⁻¹(p_upper))
                              = σ·(Φ⁻¹(q_lower) − Φ⁻¹(1 − t)),   certified when q_lower > 1 − t,

    where p_lower is the one-sided (1 - alpha) Clopper–Pearson lower bound on p from `votes` of n, q_lower the
    same bound on q from n − votes, and p_upper = 1 − q_lower the Clopper–Pearson upper bound on p. The second
    form is the one computed, so that at t = ½ (Φ⁻¹(½) = 0) both sides are exactly Cohen's σ·Φ⁻¹(pA), bit for
    bit what Smooth.certify returns for the same counts when it certifies that side.

    Args:
        votes: how many of the n noisy copies f answered c (0 ≤ votes ≤ n).
        n: noisy copies counted (≥ 1).
        threshold: t in [0, 1].
        sigma: noise standard deviation σ > 0.
        alpha: failure probability in (0, 1).
        above: True to certify "p > t", False for "p ≤ t".

    Returns:
        R ≥ 0; 0.0 when the bound does not clear the threshold (nothing certified); inf when the decision cannot
        change anywhere ("p > 0" with p_lower > 0, or "p ≤ 1").
    """
    n, alpha = _check_count("n", n), _check_alpha(alpha)
    votes = operator.index(votes)
    if not 0 <= votes <= n:
        raise ValueError(f"threshold_radius: votes must be in [0, n = {n}], got {votes}")
    threshold, sigma = float(threshold), float(sigma)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold_radius: threshold must be in [0, 1], got {threshold}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"threshold_radius: sigma must be a finite noise standard deviation > 0, got {sigma}")
    if above:
        bound, level = lower_confidence_bound(votes, n, alpha), threshold
    else:
        if threshold >= 1.0:
            return math.inf  # "p ≤ 1" holds everywhere
        bound, level = lower_confidence_bound(n - votes, n, alpha), 1.0 - threshold
    if bound <= level:
        return 0.0
    if level <= 0.0:
        return math.inf  # Gaussian smoothing keeps a positive probability positive everywhere
    return sigma * (float(norm.ppf(bound)) - float(norm.ppf(level)))


#: On CPU, Smooth hands the scanner at most this many pixels at once (8 images of 400×400), however large the
#: batch. Activations of a larger call are tensors of hundreds of MB, which the C allocator maps fresh from the
#: kernel (above its 32 MB mmap threshold) and faults in page by page on every call: with the narrow scanner at
#: 400² and batch 100, half the time went to the kernel. Chunks of 8 reuse the same heap memory and run in
#: channels_last, oneDNN's fast layout.
CPU_CHUNK_PIXELS = 8 * 400 * 400
#: Elsewhere (GPUs), at most this many (64 images of 400×400): large enough to keep a GPU busy, small enough for
#: any photo size and batch_size on a 24 GB card (the scanners' largest activation is 16 floats per input pixel,
#: 0.66 GB per tensor for a chunk; unchunked, 400 copies of a 1000×750 photo would need 19 GB for one tensor).
DEVICE_CHUNK_PIXELS = 64 * 400 * 400


def chunk_size(device: torch.device, height: int, width: int) -> int:
    """How many H×W images Smooth hands the scanner at once on `device` (CPU_CHUNK_PIXELS or DEVICE_CHUNK_PIXELS)."""
    budget = CPU_CHUNK_PIXELS if device.type == "cpu" else DEVICE_CHUNK_PIXELS
    return max(1, budget // (height * width))


def _check_count(name: str, value) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)  # int, numpy integers; not floats, which would hide a typo
    except TypeError:
        raise ValueError(f"Smooth: {name} must be an integer ≥ 1, got {value!r}") from None
    if number < 1:
        raise ValueError(f"Smooth: {name} must be an integer ≥ 1, got {number}")
    return number


def _check_alpha(alpha) -> float:
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"Smooth: alpha must be a number in (0, 1), got {alpha!r}") from None
    if not 0.0 < alpha < 1.0:  # also refuses NaN
        raise ValueError(f"Smooth: alpha must be in (0, 1), got {alpha}")
    return alpha


class Smooth:
    """A base classifier smoothed with isotropic Gaussian noise in [0,1] pixel space.

    Args:
        scanner: the base classifier f, an nn.Module mapping (B,3,H,W) images in [0,1] to (B,C) logits
            (C = 2 for the DeepRAFT scanner: 0 = clean, 1 = stamped). It is run in eval mode under no_grad;
            its own train/eval mode is restored afterwards.
        sigma: noise standard deviation σ in [0,1] pixel units; the certified radius is in the same units
            (an L2 norm over all 3·H·W pixel values in [0,1]). Use the σ the scanner was trained with.

    Noise is added to the image in [0,1] and not clamped, as in training (smoothing.noise); the scanner
    normalises its input itself. Everything runs on the scanner's device (that of its first parameter or
    buffer; CPU for a module with neither); the input image is moved there.

    Reproducibility: pass a `torch.Generator` to predict/certify. The noise is drawn on the generator's device
    and then moved to the scanner's, so a CPU generator gives the same noise whatever the scanner's device
    (slower on a GPU: use a generator on the scanner's device there). Without a generator, torch's global
    generator of the scanner's device is used.
    """

    def __init__(self, scanner: nn.Module, sigma: float):
        sigma = float(sigma)
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"Smooth: sigma must be a finite noise standard deviation > 0, got {sigma}")
        self.scanner = scanner
        self.sigma = sigma

    @property
    def device(self) -> torch.device:
        """Where the scanner's weights are, hence where the noisy copies are classified."""
        tensor = next(itertools.chain(self.scanner.parameters(), self.scanner.buffers()), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    # ------------------------------------------------------------------ public
    def predict(self, x: torch.Tensor, n: int = 100_000, alpha: float = 0.001, batch_size: int = 400,
                generator: torch.Generator | None = None) -> int:
        """Cohen's PREDICT: the majority class under noise, or ABSTAIN when the vote is not significant.

        The top two classes' counts are compared with a two-sided binomial test against p = 1/2; the class is
        returned when the p-value is ≤ alpha. The probability of returning a class other than g(x) is then at
        most alpha.

        Args:
            x: one image, (3,H,W) or (1,3,H,W), in [0,1].
            n: number of noise samples (≥ 1).
            alpha: significance level in (0,1).
            batch_size: noisy copies drawn and classified at once (≥ 1): the memory knob (on CPU the scanner sees
                them in chunks of at most chunk_size images).
            generator: a torch.Generator for reproducible noise; None uses torch's global one.

        Returns:
            The predicted class index (int), or ABSTAIN (-1).
        """
        alpha = _check_alpha(alpha)
        return self.decide(self.counts(x, n, batch_size, generator), alpha)

    def counts(self, x: torch.Tensor, n: int = 100_000, batch_size: int = 400,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """How often the base scanner answers each class on n noisy copies of one image x → int64 CPU (C,).

        `decide(counts, alpha)` turns them into PREDICT's answer; counts[STAMPED] / n is a detection score.
        """
        n, batch_size = _check_count("n", n), _check_count("batch_size", batch_size)
        return self._sample_counts(x, n, batch_size, generator)

    def predict_sequential(self, x: torch.Tensor, n: int = 1000, alpha: float = 0.001, batch_size: int = 400,
                           generator: torch.Generator | None = None, threshold: float = 0.5,
                           positive: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sequential PREDICT (smoothing.sequential) for a batch of images of one size, sharing forward passes.

        Args:
            x: images (B,3,H,W) in [0,1] (or one (3,H,W)).
            n: most noisy copies per image; alpha: the bound on a decisive wrong verdict over all looks.
            threshold: verdict `positive` when the share of its votes is above this (½: PREDICT for 2 classes).
            positive: the class whose votes are counted (1: the DeepRAFT scanner's STAMPED).

        Returns:
            (verdicts (B,): positive, 1 − positive, or ABSTAIN; votes (B,) for `positive`; n_used (B,)), int64 CPU.
            With 2 classes and threshold ½ the verdict is PREDICT's decision on the copies drawn.
        """
        n, batch_size, alpha = _check_count("n", n), _check_count("batch_size", batch_size), _check_alpha(alpha)
        x = x[None] if x.dim() == 3 else x

        def sample(active: torch.Tensor, k: int) -> torch.Tensor:
            return self.class_votes(x[active], k, positive, batch_size, generator)

        verdicts, votes, used = sequential_decide(sample, x.shape[0], n, threshold, alpha)
        verdicts = torch.where(verdicts < 0, ABSTAIN, torch.where(verdicts == 1, positive, 1 - positive))
        return verdicts, votes, used

    @torch.no_grad()
    def class_votes(self, x: torch.Tensor, k: int, cls: int, batch_size: int = 400,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """How many of k noisy copies of each image x (B,3,H,W) the scanner reads as class `cls` → (B,) int64 CPU.

        Copies of several images share each forward pass (batch_size copies at a time, in chunks of at most
        chunk_size images), image after image, so a given generator gives the same votes whatever the
        batch_size. In fp32 on every device, even inside autocast."""
        device = self.device
        x = x.to(device)
        owner = torch.arange(x.shape[0], device=device).repeat_interleave(k)
        votes = torch.zeros(x.shape[0], dtype=torch.long, device=device)
        noise_device = generator.device if generator is not None else device
        on_cpu = device.type == "cpu"
        chunk = chunk_size(device, x.shape[-2], x.shape[-1])
        was_training = self.scanner.training
        self.scanner.eval()
        try:
            for start in range(0, len(owner), batch_size):
                idx = owner[start:start + batch_size]
                noise = torch.randn((len(idx), *x.shape[1:]), generator=generator, device=noise_device,
                                    dtype=x.dtype).to(device)
                batch = noise.mul_(self.sigma).add_(x[idx])
                for s in range(0, len(idx), chunk):
                    part = batch[s:s + chunk]
                    if on_cpu:
                        part = part.contiguous(memory_format=torch.channels_last)
                    with full_precision(device):  # fp32 even inside a caller's autocast
                        hits = (self.scanner(part).argmax(1) == cls).long()
                    votes.index_add_(0, idx[s:s + chunk], hits)
        finally:
            self.scanner.train(was_training)
        return votes.cpu()

    @staticmethod
    def decide(counts: torch.Tensor, alpha: float = 0.001) -> int:
        """PREDICT's decision from class counts: the top class if a two-sided binomial test of the top two
        counts against p = 1/2 gives a p-value ≤ alpha, else ABSTAIN."""
        alpha = _check_alpha(alpha)
        top2 = torch.topk(counts, k=min(2, counts.numel())).indices.tolist()
        count1 = int(counts[top2[0]])
        count2 = int(counts[top2[1]]) if len(top2) > 1 else 0
        if binomtest(count1, count1 + count2, p=0.5).pvalue > alpha:
            return ABSTAIN
        return top2[0]

    def certify(self, x: torch.Tensor, n0: int = 100, n: int = 100_000, alpha: float = 0.001,
                batch_size: int = 400, generator: torch.Generator | None = None) -> tuple[int, float]:
        """Cohen's CERTIFY: the smoothed class and a certified L2 radius, or (ABSTAIN, 0.0).

        n0 samples select the candidate class cA (the most frequent one); n fresh samples count how often the
        scanner answers cA (nA). pA is the one-sided (1 - alpha) Clopper–Pearson lower bound on P(f(x+ε) = cA);
        if pA < 1/2 nothing is certified, else the radius is σ·Φ⁻¹(pA). Separate selection and estimation
        samples keep the bound valid: choosing cA from the same draws would bias nA upwards.

        Args:
            x: one image, (3,H,W) or (1,3,H,W), in [0,1].
            n0: selection samples (≥ 1); the paper's 100.
            n: estimation samples (≥ 1); the paper's 100,000. n caps the largest radius that can be certified:
                with nA = n the one-sided Clopper–Pearson bound is pA = alpha^(1/n) (`beta.ppf(alpha, n, 1)`),
                so the radius is at most σ·Φ⁻¹(alpha^(1/n)): at n = 100,000 and alpha = 0.001,
                pA = 0.99993092 and the largest radius is 3.81·σ (Φ⁻¹ = 3.8115); at n = 10,000, 3.20·σ; at
                n = 1,000, 2.46·σ.
            alpha: failure probability in (0,1); the paper's 0.001.
            batch_size: noisy copies drawn and classified at once (≥ 1); see predict.
            generator: a torch.Generator for reproducible noise; None uses torch's global one.

        Returns:
            (class, radius): the class index and its certified radius in [0,1]-pixel L2 units, or
            (ABSTAIN, 0.0).
        """
        n0, n = _check_count("n0", n0), _check_count("n", n)
        batch_size, alpha = _check_count("batch_size", batch_size), _check_alpha(alpha)
        selection = self._sample_counts(x, n0, batch_size, generator)
        c_a = int(selection.argmax())
        estimation = self._sample_counts(x, n, batch_size, generator)
        p_a = lower_confidence_bound(int(estimation[c_a]), n, alpha)
        if p_a < 0.5:
            return ABSTAIN, 0.0
        return c_a, self.sigma * float(norm.ppf(p_a))

    # ------------------------------------------------------------------ sampling
    def _sample_counts(self, x: torch.Tensor, num: int, batch_size: int,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """How often the scanner picks each class on `num` noisy copies of x → int64 CPU tensor (C,)."""
        counts = None
        for logits in self._noisy_logits(x, num, batch_size, generator):
            part_counts = torch.bincount(logits.argmax(1), minlength=logits.shape[1])
            counts = part_counts if counts is None else counts + part_counts
        return counts.cpu()

    def noisy_logits(self, x: torch.Tensor, num: int, batch_size: int = 400,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """The scanner's logits on `num` noisy copies x + N(0, σ²) of one image x → float32 CPU (num, C): what the
        counts are made of, for a score finer than a vote (scan.py's calibration takes the median logit margin)."""
        num, batch_size = _check_count("num", num), _check_count("batch_size", batch_size)
        return torch.cat([logits.float().cpu() for logits in self._noisy_logits(x, num, batch_size, generator)])

    @torch.no_grad()
    def _noisy_logits(self, x: torch.Tensor, num: int, batch_size: int, generator: torch.Generator | None = None):
        """Yield the scanner's logits on `num` noisy copies of x, chunk after chunk.

        The copies are drawn batch_size at a time, into one buffer reused for every batch, so at most batch_size
        noisy images (not num) are in memory at once. The scanner classifies each batch in chunks of at most
        chunk_size images, in fp32, on CPU in channels_last layout (see CPU_CHUNK_PIXELS): the same noise for a given
        generator as one call per batch, and the same logits up to float rounding.
        """
        if x.dim() == 4 and x.shape[0] == 1:
            x = x[0]
        if x.dim() != 3:
            raise ValueError(f"Smooth: x must be one image (3,H,W) or (1,3,H,W), got shape {tuple(x.shape)}")
        device = self.device
        x = x.to(device)
        if not x.is_floating_point():
            raise ValueError(f"Smooth: x must be a floating-point image in [0,1], got dtype {x.dtype}")
        noise_device = generator.device if generator is not None else device
        on_cpu = device.type == "cpu"
        chunk = chunk_size(device, x.shape[-2], x.shape[-1])
        shape = (min(batch_size, num), *x.shape)
        noise = torch.empty(shape, device=noise_device, dtype=x.dtype)
        noisy = noise if noise.device == x.device else torch.empty(shape, device=device, dtype=x.dtype)
        was_training = self.scanner.training
        self.scanner.eval()
        try:
            remaining = num
            while remaining > 0:
                this = min(batch_size, remaining)
                # normal_ draws what torch.randn would; scaling and adding in place gives x + σ·noise bit for bit
                drawn = noise[:this].normal_(generator=generator)
                batch = drawn if noisy is noise else noisy[:this].copy_(drawn)
                batch.mul_(self.sigma).add_(x)
                for start in range(0, this, chunk):
                    part = batch[start:start + chunk]
                    if on_cpu:
                        part = part.contiguous(memory_format=torch.channels_last)
                    with full_precision(device):  # fp32 even inside a caller's autocast
                        yield self.scanner(part)
                remaining -= this
        finally:
            self.scanner.train(was_training)
