"""The training half of augmentation: the view train_rs_aug.py adds to the shared loop."""
from __future__ import annotations

import torch

from engine.losses import View
from engine.training import ViewFn, linear_ramp

from .chain import StochasticChain


def augmented_noisy_view(chain: StochasticChain, std: float, aug_start: int, aug_end: int) -> ViewFn:
    """A view function for the shared loop: L_A^DA on `clamp(chain(v)) + N(0, std²)` for v in [x, x'].

    Both the chain's strength and the view's weight in L_A follow `linear_ramp(step, aug_start, aug_end)`:
    nothing before aug_start (the view is left out, saving its cost), full strength and weight 1 from aug_end.
    The noise is not clamped, as in the smoothing view, so that the scanner can be certified at sigma = std.
    """

    def view(pair: torch.Tensor, step: int) -> list[View]:
        ramp = linear_ramp(step, aug_start, aug_end)
        if ramp == 0:
            return []
        corrupted = chain(pair, ramp).clamp(0, 1)
        return [View("aug", corrupted + std * torch.randn_like(corrupted), weight=ramp)]

    return view
