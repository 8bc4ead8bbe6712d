"""The training half of augmentation: the chain a script's flags ask for, and the views it adds to the loop."""
from __future__ import annotations

import torch

from engine.losses import View
from engine.training import ViewFn, ramp

from .chain import StochasticChain
from .original import original_chain


def augmentation_chain(args, kind: str):
    """The chain of --aug_chain: the original's ('rs_aug' or 'plain_da' ranges, p = aug_prb, per-batch draws)
    or the stochastic one (--augs with the training preset's ranges, p = aug_prb per image)."""
    if args.aug_chain == "original":
        return original_chain(kind, p=args.aug_prb, seed=args.seed)
    return StochasticChain.from_names(args.augs, preset="train", p=args.aug_prb)


def augmented_view(chain, weight: float = 1.0) -> ViewFn:
    """Plain+DA (train.py --aug): the scanner also sees [chain(x), chain(x')], the chain applied to the clean and
    the stamped halves separately (each call draws its own parameters), at full strength, with `weight`."""

    def view(pair: torch.Tensor, step: int) -> list[View]:
        clean, stamped = pair.chunk(2)
        return [View("aug", torch.cat([chain(clean), chain(stamped)]), weight=weight)]

    return view


def augmented_noisy_view(chain, std: float, aug_start: int, aug_end: int, aug_w: float = 1.0,
                         strength_ramp: bool = True) -> ViewFn:
    """A view function for the shared loop: L_A^DA on `clamp(chain(v)) + N(0, std²)` for v in [x, x'].

    Its weight in L_A is `ramp(step, aug_start, aug_end, slope=aug_w)`: 0 before aug_start (the view is left out,
    saving its cost), rising to 1. With `strength_ramp` the chain's strength follows the same ramp, otherwise it
    is full from the start (the original). The noise is not clamped, as in the smoothing view, so that the
    scanner can be certified at sigma = std.
    """

    def view(pair: torch.Tensor, step: int) -> list[View]:
        weight = ramp(step, aug_start, aug_end, aug_w)
        if weight == 0:
            return []
        corrupted = chain(pair, weight if strength_ramp else None).clamp(0, 1)
        return [View("aug", corrupted + std * torch.randn_like(corrupted), weight=weight)]

    return view
