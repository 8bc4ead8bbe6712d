"""Tables 1 and 2 in one pass over the photos: verdicts under each condition, and imperceptibility."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from engine.evaluation import MIN_SSIM_SIDE
from models import CLEAN, STAMPED
from smoothing.certify import stamp

from .calibration import auc
from .judge import Judge


@torch.no_grad()
def detection_pass(encoder, judge: Judge, loader, conditions: dict, device, *, seed: int = 0, lpips_model=None,
                   keep: int = 0, keep_mask: torch.Tensor | None = None,
                   progress: Callable[[int], None] | None = None) -> dict:
    """Stamp every photo, judge it clean and stamped under every condition, and measure the stamp.

    Returns {"verdicts": {condition: (clean (N,), stamped (N,))}, "scores": {condition: (clean, stamped)},
    "psnr", "ssim", "lpips" (N,) tensors (lpips None without its weights), "kept": (clean, stamped) (K,3,H,W)
    CPU tensors of the first `keep` images (of those where `keep_mask`, (N,) bool, is True: e.g. one tile per
    photo, so that attacks and certification count photos)}. Each condition's random draws are seeded by (seed, batch,
    condition), so a rerun gives the same numbers. `progress(n)` is called after each batch of n photos.

    encoder None (a scanner-only model folder): only the clean photos are judged; every stamped tensor, and
    psnr/ssim, are empty, lpips None.
    """
    if encoder is not None:
        encoder.eval()
    verdicts = {name: ([], []) for name in conditions}
    scores = {name: ([], []) for name in conditions}
    quality = {"psnr": [], "ssim": [], "lpips": []}
    kept_clean, kept_stamped = [], []
    start = 0
    for b, x in enumerate(loader):
        x = x.to(device)
        rows = (keep_mask[start:start + len(x)] if keep_mask is not None
                else torch.ones(len(x), dtype=torch.bool)).to(x.device)
        start += len(x)
        stamped = stamp(encoder, x) if encoder is not None else None
        if stamped is not None:
            quality["psnr"].append(peak_signal_noise_ratio(stamped, x, data_range=1.0, reduction="none",
                                                           dim=(1, 2, 3)).cpu())
            if min(x.shape[-2:]) >= MIN_SSIM_SIDE:
                quality["ssim"].append(structural_similarity_index_measure(stamped, x, data_range=1.0,
                                                                           reduction="none").reshape(-1).cpu())
            if lpips_model is not None:
                quality["lpips"].append(lpips_model(stamped, x, normalize=True).reshape(-1).cpu())
        for c, (name, condition) in enumerate(conditions.items()):
            torch.manual_seed((seed * 1_000_003 + b * 1_009 + c) % 2 ** 63)  # a drawn seed has 63 bits
            for i, images in enumerate((x, stamped) if stamped is not None else (x,)):
                seen = images if condition is None else condition(images)
                v, s = judge(seen)
                verdicts[name][i].append(v)
                scores[name][i].append(s)
        if sum(len(k) for k in kept_clean) < keep and bool(rows.any()):
            kept_clean.append(x[rows].cpu())
            if stamped is not None:
                kept_stamped.append(stamped[rows].cpu())
        if progress:
            progress(x.shape[0])
    cat = lambda parts: torch.cat(parts) if parts else torch.empty(0)  # noqa: E731
    return {
        "verdicts": {k: (cat(v[0]), cat(v[1])) for k, v in verdicts.items()},
        "scores": {k: (cat(v[0]), cat(v[1])) for k, v in scores.items()},
        "psnr": cat(quality["psnr"]), "ssim": cat(quality["ssim"]),
        "lpips": cat(quality["lpips"]) if lpips_model is not None else None,
        "kept": (common_size(kept_clean)[:keep], common_size(kept_stamped)[:keep]),
    }


def common_size(batches: list[torch.Tensor]) -> torch.Tensor:
    """Batches of images, possibly of different sizes (photos at native resolution) → one (N,3,h,w) tensor,
    each image centre-cropped to the smallest height and width among them, so that attacks and certification
    can batch them. Batches of one size are simply concatenated."""
    if not batches:
        return torch.empty(0)
    h = min(b.shape[-2] for b in batches)
    w = min(b.shape[-1] for b in batches)
    crops = []
    for b in batches:
        top, left = (b.shape[-2] - h) // 2, (b.shape[-1] - w) // 2
        crops.append(b[..., top:top + h, left:left + w])
    return torch.cat(crops)


def accuracy_row(clean_verdicts: torch.Tensor, stamped_verdicts: torch.Tensor,
                 clean_scores: torch.Tensor, stamped_scores: torch.Tensor) -> dict:
    """Accuracy on clean photos (read CLEAN), stamped ones (read STAMPED), their mean, abstentions, ROC-AUC.

    Without stamped photos (a scanner-only model) the stamped figures are None and the row gives the
    false-positive rate instead ("fpr": clean photos read as stamped; abstentions over the clean photos)."""
    acc_clean = (clean_verdicts == CLEAN).double().mean().item()
    if len(stamped_verdicts) == 0:
        return {"acc_clean": acc_clean, "acc_stamped": None, "acc": None,
                "fpr": (clean_verdicts == STAMPED).double().mean().item(),
                "abstain": clean_verdicts.lt(0).double().mean().item(), "auc": None, "n": len(clean_verdicts)}
    acc_stamped = (stamped_verdicts == STAMPED).double().mean().item()
    abstained = torch.cat([clean_verdicts, stamped_verdicts]).lt(0).double().mean().item()
    return {"acc_clean": acc_clean, "acc_stamped": acc_stamped, "acc": (acc_clean + acc_stamped) / 2,
            "abstain": abstained, "auc": auc(clean_scores, stamped_scores), "n": len(clean_verdicts)}


def by_photo(verdicts: torch.Tensor, scores: torch.Tensor, photo_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tile verdicts and scores (N,) → one verdict and score per photo (P,), in increasing photo id.

    A platform that scans a photo tile by tile flags it when any tile is flagged, so a photo's score is the
    maximum over its tiles, and its verdict STAMPED if any tile reads STAMPED, else ABSTAIN if any tile
    abstained, else CLEAN (for the plain judge, verdict STAMPED iff score > 0, the same rule). Tiles of one
    photo are not independent samples: every interval, calibration and "backed" claim counts these photos.
    """
    photos, inverse = torch.unique(photo_ids, return_inverse=True)
    p = len(photos)
    score = torch.full((p,), -math.inf, dtype=torch.float64).scatter_reduce(0, inverse, scores.double(), "amax")

    def any_of(flags):
        return torch.zeros(p, dtype=torch.long).scatter_reduce(0, inverse, flags.long(), "amax").bool()

    verdict = torch.where(any_of(verdicts == STAMPED), STAMPED, torch.where(any_of(verdicts < 0), -1, CLEAN))
    return verdict, score.to(scores.dtype)


def photo_means(values: torch.Tensor, photo_ids: torch.Tensor) -> torch.Tensor:
    """Per-tile values (N,) → the mean over each photo's tiles (P,), photos in photo_ids' sorted order."""
    photos, inverse = torch.unique(photo_ids, return_inverse=True)
    sums = torch.zeros(len(photos), dtype=torch.float64).index_add_(0, inverse, values.double())
    counts = torch.zeros(len(photos), dtype=torch.float64).index_add_(0, inverse, torch.ones(len(values)).double())
    return (sums / counts).to(values.dtype)


def mean_std(values: torch.Tensor | None) -> dict:
    """{"mean", "std", "n"} of per-photo values (std with Bessel's correction; NaN below 2 values)."""
    if values is None or len(values) == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    values = values.double()
    return {"mean": values.mean().item(), "std": values.std().item() if len(values) > 1 else math.nan,
            "n": len(values)}
