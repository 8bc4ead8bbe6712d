"""Sequential PREDICT: stop drawing noisy copies as soon as the vote is decisive, with the same error guarantee.

Cohen et al.'s PREDICT fixes n in advance and runs a two-sided binomial test of the vote share against ½. Most
photos' votes are lopsided (shares of 0 or 1), which a few dozen copies decide; `sequential_decide` looks at the
votes after 16, 64, 256, … copies (×4 each time, the last look at n) and stops at the first decisive look. The
first look is the smallest of 16, 32, 64, … copies at which a unanimous vote, either way, is already decisive
(16 at PREDICT's threshold ½; more the further a calibrated threshold lies from ½), so that a lopsided photo
stops there.

The guarantee: PREDICT's, "the probability of a decisive verdict on the wrong side of the threshold t is at most
α", over all looks together. Each look k runs the two-sided binomial test of H0: p = t at its own level α_k, with
Σ α_k = α (a Bonferroni split of α across the planned looks, the simplest valid group-sequential design; see
Jennison & Turnbull, *Group Sequential Methods*, 2000, ch. 2, or any union bound): a wrong decisive verdict needs
at least one look whose test rejects toward the wrong side, and when p is on the other side of t, each look's
test does that with probability at most α_k, so the union over the looks is at most α. The last look at n gets
α/2 and the K − 1 earlier looks share the other α/2, so the final test is close to fixed-n PREDICT's (at level
α/2 instead of α: slightly more abstentions at n, never more wrong verdicts). As in PREDICT, an abstention is
not an error: the photo gets no verdict when even n copies cannot tell its share from t.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from scipy.stats import binom

#: The smallest first look and the growth factor of the looks: 16, 64, 256, 1,024, … copies. At threshold ½ and
#: PREDICT's α = 0.001 split over four looks a unanimous vote of 16 is decisive (2·½¹⁶ = 3.1e-5 ≤ α/6); starting
#: at 16 rather than 32 halves the copies evaluate.py draws, since most photos' votes are unanimous.
FIRST_LOOK, LOOK_FACTOR = 16, 4


def looks(n: int, first: int = FIRST_LOOK, factor: int = LOOK_FACTOR) -> list[int]:
    """Cumulative numbers of noisy copies at each look: first, first·factor, … below n, then n."""
    if n < 1 or first < 1 or factor < 2:
        raise ValueError(f"looks: need n ≥ 1, first ≥ 1 and factor ≥ 2, got n {n}, first {first}, factor {factor}")
    out, k = [], first
    while k < n:
        out.append(k)
        k *= factor
    return out + [n]


def first_look(n: int, threshold: float, alpha: float, smallest: int = FIRST_LOOK, factor: int = LOOK_FACTOR) -> int:
    """The smallest first look of `smallest`, 2·`smallest`, 4·`smallest`, … copies (n at most) at which a unanimous
    vote either way rejects p = threshold at that look's level. Fixed by (n, threshold, alpha) before any copy is
    drawn, so the guarantee holds as for any planned schedule; a first look that no vote could decide would only
    cost copies (at threshold 0.7, 16 of 16 has p 0.0033)."""
    k = smallest
    while k < n:
        level = look_levels(len(looks(n, k, factor)), alpha)[0]
        p_values = two_sided_pvalues(k, threshold)
        if p_values[0] <= level and p_values[k] <= level:
            return k
        k *= 2
    return n


def look_schedule(n: int, threshold: float, alpha: float, first: int | None = None,
                  factor: int = LOOK_FACTOR) -> list[int]:
    """The looks sequential_decide takes: first (default first_look), first·factor, …, n; only n at a threshold of
    0 or 1, where there is nothing to test."""
    if not 0 < threshold < 1:
        return [n]
    return looks(n, first or first_look(n, threshold, alpha, factor=factor), factor)


def look_levels(count: int, alpha: float) -> list[float]:
    """The test level of each of `count` looks: α/2 at the last, α/(2(count − 1)) at each earlier one (sum α)."""
    if count == 1:
        return [alpha]
    return [alpha / (2 * (count - 1))] * (count - 1) + [alpha / 2]


def two_sided_pvalues(n: int, p: float) -> np.ndarray:
    """The p-value of scipy's two-sided `binomtest(k, n, p)` for every k = 0..n at once → (n + 1,) float64.

    The same definition (the total probability of the outcomes no more likely than k, with scipy's relative
    tolerance 1e-7), computed once per look instead of once per image and look."""
    pmf = binom.pmf(np.arange(n + 1), n, p)
    order = np.sort(pmf)
    cumulative = np.cumsum(order)
    at_most = np.searchsorted(order, pmf * (1 + 1e-7), side="right")
    return np.minimum(1.0, cumulative[at_most - 1])


def sequential_decide(sample: Callable[[torch.Tensor, int], torch.Tensor], batch: int, n: int,
                      threshold: float = 0.5, alpha: float = 0.001, first: int | None = None,
                      factor: int = LOOK_FACTOR) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequential PREDICT for `batch` images at once.

    Args:
        sample: (indices (A,) int64 of the images still undecided, k) → (A,) int64: how many of k more noisy
            copies of each of those images the base classifier reads as the positive class. Called once per look
            for all undecided images together, so images can share forward passes.
        batch: number of images.
        n: most copies per image (the last look).
        threshold: t in (0, 1): the verdict is positive when the share of positive votes is above t (½ is PREDICT).
            At t = 0 or 1 there is nothing to test: all n copies are drawn and the share compared with t.
        alpha: the bound on the probability of a decisive verdict on the wrong side of t.
        first, factor: the looks are first, first·factor, … copies, then n; first defaults to
            first_look(n, threshold, alpha).

    Returns:
        (verdicts (batch,): 1 positive, 0 negative, -1 abstain; votes (batch,): positive votes; n_used (batch,):
        copies drawn per image), int64 CPU tensors.
    """
    schedule = look_schedule(n, threshold, alpha, first, factor)
    levels = look_levels(len(schedule), alpha)
    verdicts = torch.full((batch,), -1, dtype=torch.long)
    votes = torch.zeros(batch, dtype=torch.long)
    used = torch.zeros(batch, dtype=torch.long)
    active = torch.arange(batch)
    drawn = 0
    for total, level in zip(schedule, levels):
        if len(active) == 0:
            break
        votes[active] += sample(active, total - drawn).cpu().long()
        used[active] = total
        drawn = total
        above = votes[active] > threshold * total  # share > t
        if 0 < threshold < 1:
            decisive = torch.from_numpy(two_sided_pvalues(total, threshold) <= level)[votes[active]]
        else:
            decisive = torch.ones(len(active), dtype=torch.bool)
        verdicts[active[decisive]] = above[decisive].long()
        active = active[~decisive]  # after the last look (n copies) the undecided abstain: their verdict stays -1
    return verdicts, votes, used
