"""The training half of augmentation: the chain a script's flags ask for, and the views it adds to the loop."""
from __future__ import annotations

from typing import Callable

import kornia
import torch

from engine.losses import View
from engine.training import ViewFn, ramp

from .chain import StochasticChain
from .original import original_chain
from .resample import PlatformResampling


def augmentation_chain(args, kind: str):
    """The chain of --aug_chain: the original's ('rs_aug' or 'plain_da' ranges, p = aug_prb, per-batch draws)
    or the stochastic one (--augs with the training preset's ranges, p = aug_prb per image)."""
    if args.aug_chain == "original":
        return original_chain(kind, p=args.aug_prb, seed=args.seed)
    return StochasticChain.from_names(args.augs, preset="train", p=args.aug_prb)


#: --aug_downscale draws its factor from this many evenly spaced values between SMALLEST and 1 (both included),
#: not from a continuous U(SMALLEST, 1): every factor gives the scanner a new input shape, and cuDNN autotunes
#: (benchmark mode) each new shape once, so a continuous factor would have it tune hundreds of shapes at 400².
DOWNSCALE_STEPS = 8


def downscale_factors(smallest: float) -> list[float]:
    """The factors `random_downscale` draws from: DOWNSCALE_STEPS values from `smallest` to 1, evenly spaced."""
    n = DOWNSCALE_STEPS
    return [smallest + (1 - smallest) * k / (n - 1) for k in range(n - 1)] + [1.0]


def random_downscale(images: torch.Tensor, smallest: float) -> torch.Tensor:
    """(B,C,H,W) → (B,C,h,w): both sides × one factor for the whole batch (a batch holds one size), drawn
    uniformly from `downscale_factors(smallest)` (a grid, so that the output takes at most DOWNSCALE_STEPS
    shapes), antialiased bilinear, and not scaled back: a photo that a platform shrinks before recompressing it,
    which the scanner then reads at its new size. The chain's "resize" corruption scales back to the input size,
    so without this a scanner never sees a stamp at another scale. smallest = 1: the images unchanged."""
    if smallest >= 1:
        return images
    factors = downscale_factors(smallest)
    # One CPU draw from torch's generator (no device sync), floored onto the grid: each value has chance 1/n.
    factor = factors[min(int(float(torch.rand(())) * len(factors)), len(factors) - 1)]
    if factor == 1.0:
        return images  # the grid's top value: the pair as it is
    return kornia.geometry.transform.rescale(images, factor, antialias=True)


def resampler(resample) -> Callable[[torch.Tensor], torch.Tensor]:
    """--aug_resample: True → augment.resample.PlatformResampling() (stamp.py's round trip, a platform's resampling,
    scan.py's working-size step: one draw per batch), False/None → the identity; a module or function: itself."""
    if resample is True:
        return PlatformResampling()
    return resample or (lambda images: images)


def augmented_view(chain, weight: float = 1.0, downscale: float = 1.0, resample=False) -> ViewFn:
    """Plain+DA (train.py --aug): the scanner also sees [chain(x), chain(x')], the chain applied to the clean and
    the stamped halves separately (each call draws its own parameters), at full strength, with `weight`; the pair
    first shrunk by `random_downscale(pair, downscale)`, then, with `resample` (--aug_resample), sent through
    `resampler(resample)` as one batch (the clean and the stamped half alike)."""
    resample = resampler(resample)

    def view(pair: torch.Tensor, step: int) -> list[View]:
        clean, stamped = resample(random_downscale(pair, downscale)).chunk(2)
        return [View("aug", torch.cat([chain(clean), chain(stamped)]), weight=weight)]

    return view


def augmented_noisy_view(chain, std: float, aug_start: int, aug_end: int, aug_w: float = 1.0,
                         strength_ramp: bool = True, downscale: float = 1.0, resample=False) -> ViewFn:
    """A view function for the shared loop: L_A^DA on `clamp(chain(v)) + N(0, std²)` for v in [x, x'].

    Its weight in L_A is `ramp(step, aug_start, aug_end, slope=aug_w)`: 0 before aug_start (the view is left out,
    saving its cost), rising to 1. With `strength_ramp` the chain's strength follows the same ramp, otherwise it
    is full from the start (the original). The noise is not clamped, as in the smoothing view, so that the
    scanner can be certified at sigma = std. With `downscale` < 1 the pair is first shrunk by
    `random_downscale(pair, downscale)`; with `resample` (--aug_resample) it then goes through `resampler(resample)`
    before the chain.
    """
    resample = resampler(resample)

    def view(pair: torch.Tensor, step: int) -> list[View]:
        weight = ramp(step, aug_start, aug_end, aug_w)
        if weight == 0:
            return []
        pair = resample(random_downscale(pair, downscale))
        corrupted = chain(pair, weight if strength_ramp else None).clamp(0, 1)
        return [View("aug", corrupted + std * torch.randn_like(corrupted), weight=weight)]

    return view
