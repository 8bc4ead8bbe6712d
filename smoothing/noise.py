"""The training half of randomized smoothing: the scanner learns to classify [x, x'] under Gaussian noise."""
from __future__ import annotations

import math

import torch

from engine.cli import positive_float
from engine.losses import View
from engine.training import ViewFn


def gaussian_noise_view(std: float, weight: float = 1.0) -> ViewFn:
    """A view function for the shared loop: the scanner sees `pair + N(0, std²)` instead of the pair.

    Args:
        std: noise standard deviation σ in [0,1] pixel units (the paper trains with 0.25, 0.5 and 0.75).
            Certify a model with the same σ it was trained with: a smoothed classifier is only as good as its
            base classifier is under that noise.

    Returns:
        `views(pair, step) -> [View("noisy", pair + std·ε, weight)]`, with pair (2B,3,H,W) in [0,1] and ε ~ N(0, I) of
        the same shape, dtype and device. The result is not clamped to [0,1], as in Cohen et al. (2019):
        certification (smoothing.core.Smooth) adds the same unclamped noise, and training and certifying
        must see the same distribution. The noise comes from torch's global generator, so the run's --seed
        (and the RNG state a checkpoint restores) decides it.

    Raises:
        ValueError: std is not a finite number > 0.
    """
    std = float(std)
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"--std must be a finite noise standard deviation > 0 (in [0,1] pixel units), got {std}")

    def noisy_view(pair: torch.Tensor, step: int) -> list[View]:
        return [View("noisy", pair + std * torch.randn_like(pair), weight)]

    return noisy_view


def add_std_flag(group) -> None:
    """The --std flag of train_rs.py and train_rs_aug.py."""
    group.add_argument("--std", type=positive_float, default=0.5,
                       help="std σ of the Gaussian noise added to the scanner's input, in [0,1] pixel units (the "
                            "paper: 0.25, 0.5, 0.75); certify with the same sigma")
