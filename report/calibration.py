"""Calibrated detection: ROC, AUC, and thresholds that hold a stated false-block rate.

A platform that blocks forwarding needs to say how often it blocks an innocent photo. From the scores of
clean photos (negatives) and stamped photos (positives), we pick the threshold whose false-positive rate
(FPR) is at most the target with 95% confidence (an exact Clopper–Pearson bound), and report the detection
rate (TPR) it leaves, with its exact interval. With n clean photos and no false positive, the bound is about
3/n (the rule of three): stating FPR ≤ 1% needs 299 clean photos, FPR ≤ 0.1% needs 2,995. The result says
whether the data can back the target.
"""
from __future__ import annotations

import math

import torch
from scipy.stats import beta
from torchmetrics.functional.classification import binary_auroc, binary_roc

#: false-positive rates a platform would state
TARGET_FPRS = (0.01, 0.001)


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided interval for a binomial proportion k/n."""
    if n == 0:
        return 0.0, 1.0
    tail = (1 - confidence) / 2
    low = 0.0 if k == 0 else float(beta.ppf(tail, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - tail, k + 1, n - k))
    return low, high


def _scores_and_labels(clean: torch.Tensor, stamped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.cat([clean, stamped]).double()
    labels = torch.cat([torch.zeros(len(clean)), torch.ones(len(stamped))]).long()
    return scores, labels


def roc_curve(clean: torch.Tensor, stamped: torch.Tensor) -> dict:
    """ROC (torchmetrics) of scores where higher means 'stamped' → {fpr, tpr, thresholds, auc} as lists.

    The thresholds are on the scores' own scale: torchmetrics passes scores outside [0, 1] (logits) through a
    sigmoid first, so its thresholds are mapped back (exact in double precision up to |score| ≈ 36, where the
    sigmoid rounds to 0 or 1)."""
    scores, labels = _scores_and_labels(clean, stamped)
    fpr, tpr, thresholds = binary_roc(scores, labels, thresholds=None)
    if ((scores < 0) | (scores > 1)).any():
        thresholds = torch.logit(thresholds.double())
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thresholds.tolist(),
            "auc": float(binary_auroc(scores, labels, thresholds=None))}


def auc(clean: torch.Tensor, stamped: torch.Tensor) -> float:
    scores, labels = _scores_and_labels(clean, stamped)
    return float(binary_auroc(scores, labels, thresholds=None))


def fpr_upper_bound(false_pos: int, n_clean: int, confidence: float = 0.95) -> float:
    """One-sided exact upper confidence bound on the false-positive rate."""
    if false_pos >= n_clean:
        return 1.0
    return float(beta.ppf(confidence, false_pos + 1, n_clean - false_pos))


def operating_point(clean: torch.Tensor, stamped: torch.Tensor, target_fpr: float,
                    confidence: float = 0.95) -> dict:
    """A threshold t (verdict 'stamped' iff score > t) that holds the false-positive rate at target_fpr.

    We allow the most false positives k whose FPR's one-sided upper confidence bound is ≤ target_fpr: then
    "FPR ≤ target" holds with that confidence, not just on this sample. Every threshold from the (k+1)-th
    highest clean score up to the next higher score (clean or stamped) makes the same verdicts on the data
    (`gap`); we take the middle of that gap, so that a new photo scoring a little above the highest clean photo
    allowed is not flagged for it, nor a stamped one a little below the lowest caught missed. The bound still
    holds: a threshold above that order statistic flags no more clean photos than it does. When even zero false
    positives cannot back the target (too few clean photos; `clean_needed` says how many), the gap starts at
    the highest clean score and `backed` is False. Returns the threshold, its gap, FPR (with its bound), TPR
    with its exact two-sided interval, and the counts.
    """
    clean, stamped = clean.double().sort(descending=True).values, stamped.double()
    n_clean, n_stamped = len(clean), len(stamped)
    allowed = 0  # the most false positives whose upper bound stays within the target
    while allowed + 1 < n_clean and fpr_upper_bound(allowed + 1, n_clean, confidence) <= target_fpr:
        allowed += 1
    # at most `allowed` clean scores lie strictly above the (allowed+1)-th highest one
    low = float(clean[allowed]) if n_clean else math.inf
    higher = torch.cat([clean, stamped])
    higher = higher[higher > low]
    high = float(higher.min()) if len(higher) else math.inf
    middle = (low + high) / 2
    threshold = middle if low < middle < high else low  # no higher score, or none representable between
    false_pos = int((clean > threshold).sum())
    true_pos = int((stamped > threshold).sum())
    upper = fpr_upper_bound(false_pos, n_clean, confidence)
    return {
        "target_fpr": target_fpr, "threshold": threshold, "gap": [low, high], "confidence": confidence,
        "fpr": false_pos / n_clean if n_clean else float("nan"), "fpr_upper_bound": upper,
        "tpr": true_pos / n_stamped if n_stamped else float("nan"),
        "tpr_ci": list(clopper_pearson(true_pos, n_stamped, confidence)),
        "n_clean": n_clean, "n_stamped": n_stamped, "backed": upper <= target_fpr,
        "clean_needed": math.ceil(math.log(1 - confidence) / math.log(1 - target_fpr)),
    }
