"""The training half of augmentation: the chain a script's flags ask for, and the views it adds to the loop."""
from __future__ import annotations

import kornia
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


def random_downscale(images: torch.Tensor, smallest: float) -> torch.Tensor:
    """(B,C,H,W) → (B,C,h,w): both sides × one factor U(smallest, 1) for the whole batch (a batch holds one
    size), antialiased bilinear, and not scaled back: a photo that a platform shrinks before recompressing it,
    which the scanner then reads at its new size. The chain's "resize" corruption scales back to the input size,
    so without this a scanner never sees a stamp at another scale. smallest = 1: the images unchanged."""
    if smallest >= 1:
        return images
    factor = smallest + (1 - smallest) * float(torch.rand(()))  # a CPU draw from torch's generator: no device sync
    return kornia.geometry.transform.rescale(images, factor, antialias=True)


def augmented_view(chain, weight: float = 1.0, downscale: float = 1.0) -> ViewFn:
    """Plain+DA (train.py --aug): the scanner also sees [chain(x), chain(x')], the chain applied to the clean and
    the stamped halves separately (each call draws its own parameters), at full strength, with `weight`; the pair
    first shrunk by `random_downscale(pair, downscale)`."""

    def view(pair: torch.Tensor, step: int) -> list[View]:
        clean, stamped = random_downscale(pair, downscale).chunk(2)
        return [View("aug", torch.cat([chain(clean), chain(stamped)]), weight=weight)]

    return view


def augmented_noisy_view(chain, std: float, aug_start: int, aug_end: int, aug_w: float = 1.0,
                         strength_ramp: bool = True, downscale: float = 1.0) -> ViewFn:
    """A view function for the shared loop: L_A^DA on `clamp(chain(v)) + N(0, std²)` for v in [x, x'].

    Its weight in L_A is `ramp(step, aug_start, aug_end, slope=aug_w)`: 0 before aug_start (the view is left out,
    saving its cost), rising to 1. With `strength_ramp` the chain's strength follows the same ramp, otherwise it
    is full from the start (the original). The noise is not clamped, as in the smoothing view, so that the
    scanner can be certified at sigma = std. With `downscale` < 1 the pair is first shrunk by
    `random_downscale(pair, downscale)`.
    """

    def view(pair: torch.Tensor, step: int) -> list[View]:
        weight = ramp(step, aug_start, aug_end, aug_w)
        if weight == 0:
            return []
        corrupted = chain(random_downscale(pair, downscale), weight if strength_ramp else None).clamp(0, 1)
        return [View("aug", corrupted + std * torch.randn_like(corrupted), weight=weight)]

    return view
