"""Resampling as platforms and the product do it, for training: differentiable, batched, one size per batch.

The corruptions of the chain (augment.corruptions) keep the image's size; the stamp a platform resamples does not.
`PlatformResampling` (train.py --aug and train_rs_aug.py with `--aug_resample on`) sends the pair [x, x'] the
augmented view starts from where a photo goes between stamp.py and scan.py:

1. **stamp.py's round trip** (augment.resample.PHOTO_SIZES > 1): a photo larger than the working size is stamped at
   the working size and the residual is upsampled (product.stamping.upsample_residual: bilinear) to the photo's
   size and added there. The training crop x plays the photo at the working size; the photo of k× its size is its
   bilinear upsampling X = up_k(x), so that up_k(x') = up_k(x) + up_k(δ) is exactly stamp.py's X + up_k(δ) (the
   interpolation is linear; only where x + δ was clamped at the working size do they differ). The file is then
   8-bit (`quantise`, straight-through), as stamp.py writes it.
2. **the platform's resampling**: each side × a factor from `FACTORS` (0.4 to 2), with a filter from `FILTERS`:
   Pillow's BOX, BILINEAR, BICUBIC or LANCZOS, antialiased when shrinking, computed as Pillow does (`resize`,
   written here: torch and kornia have no Lanczos, and their bicubic differs from Pillow's at edges), then 8-bit
   again.
3. **scan.py's working-size step** (product.stamping.to_working, the very function scan.py calls): a received photo
   whose long side exceeds the working size is brought down to it (antialiased bilinear); a smaller one is read at
   its own size, the scanner being fully convolutional. The working size is the crop's long side divided by the
   photo size (½×: a small photo, read at up to twice the crop's size).

Every size comes from a grid (factors × photo sizes), so the scanner sees at most ten input shapes (cuDNN autotunes
each new shape once) and the large intermediate images stay within `MAX_FILE` times the crop's side.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from product.stamping import to_working, upsample_residual

#: the platforms' resampling filters: Pillow's BOX, BILINEAR, BICUBIC and LANCZOS (what Pillow-based servers and
#: browsers use; augment.forwarding's Downscale and LongSide use LANCZOS, its Resample BILINEAR)
FILTERS = ("area", "bilinear", "bicubic", "lanczos")
#: the platform's factor on each side, a grid from 0.4 (a thumbnail) to 2 (a display's zoom before a screenshot):
#: a continuous factor would give the scanner a new input shape, hence a new cuDNN autotuning, nearly every batch
FACTORS = (0.4, 0.5, 0.6, 0.75, 0.9, 1.0, 1.25, 1.5, 2.0)
#: the photo's long side over the working size: the product stage's ½× (a small web image), 1×, 2× and 4× (a photo
#: stamped through stamp.py's round trip). 1 stands for every photo at or just below the working size.
PHOTO_SIZES = (0.5, 1.0, 2.0, 4.0)
#: the platform's file is at most this many times the crop's side (a 4× photo is not also upscaled): the cost bound
MAX_FILE = 4.0


def quantise(x: torch.Tensor, half_up: bool = False) -> torch.Tensor:
    """round(255·clamp(x, 0, 1))/255, what an 8-bit file holds, with the identity as its gradient (straight-through).
    Halves round to even, as torch.round and stamp.py do; `half_up`: upwards, as Pillow's resampling does. The
    rounding is computed in place on one temporary: at 8×1,600² on a CPU each pass over the batch costs 0.3 s."""
    with torch.no_grad():
        step = x.clamp(0, 1).mul_(255)
        step = step.add_(0.5).floor_() if half_up else step.round_()
        step = step.div_(255).sub_(x)
    return x + step


def _box(t):
    return ((t > -0.5) & (t <= 0.5)).to(t.dtype)


def _triangle(t):
    return (1 - t.abs()).clamp_min(0)


def _cubic(t, a=-0.5):
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = (((t - 5) * t + 8) * t - 4) * a
    return torch.where(t < 1, near, torch.where(t < 2, far, 0.0))


def _lanczos(t):
    return torch.where((t >= -3) & (t < 3), torch.sinc(t) * torch.sinc(t / 3), 0.0)


#: filter → (kernel, support in input pixels before widening): Pillow's box_filter, bilinear_filter, bicubic_filter
#: (a = −0.5) and lanczos_filter (Resample.c)
KERNELS = {"area": (_box, 0.5), "bilinear": (_triangle, 1.0), "bicubic": (_cubic, 2.0), "lanczos": (_lanczos, 3.0)}


def pillow_weights(n_in: int, n_out: int, filter: str, device=None, dtype=torch.float32) -> torch.Tensor:
    """(n_out, n_in): the resampling matrix of one axis as Pillow computes it (Resample.c precompute_coeffs): output
    pixel i is centred at (i + 0.5)·n_in/n_out in input pixels; the kernel is widened by max(1, n_in/n_out), so it
    is antialiased when shrinking; taps outside the image are dropped and each row is normalised to sum 1. Built
    from device arithmetic only (a tensor made from Python data would be a host-to-device copy on a GPU)."""
    kernel, support = KERNELS[filter]
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    support *= stretch
    centre = (torch.arange(n_out, device=device, dtype=torch.float64) + 0.5) * scale
    taps = torch.arange(n_in, device=device, dtype=torch.float64)
    # Pillow's window: taps from int(centre − support + 0.5) to int(centre + support + 0.5), exclusive
    window = (taps[None, :] >= (centre - support + 0.5).floor()[:, None]) & \
             (taps[None, :] < (centre + support + 0.5).floor()[:, None])
    weights = kernel((taps[None, :] - centre[:, None] + 0.5) / stretch) * window
    return (weights / weights.sum(1, keepdim=True)).to(dtype)


def resize(x: torch.Tensor, size: tuple[int, int], filter: str) -> torch.Tensor:
    """x (B,C,H,W) in [0,1] → (B,C,h,w) in [0,1], resampled as Pillow's Image.resize(size, filter) with reducing_gap
    None: area (Pillow's BOX), bilinear, bicubic or lanczos (Lanczos-3), each antialiased when shrinking.

    Written here as two matrix products (`pillow_weights`: columns first, then rows, as Pillow does) because torch
    and kornia have no Lanczos at all, and their antialiased bilinear and bicubic do not clip between the two passes
    as Pillow does, which Pillow's 8-bit intermediate image does (and it rounds there: `quantise`, straight-through).
    Differentiable and batched, on x's device. Pillow's fixed-point weights make an 8-bit result differ from
    Pillow's by at most a level or so (tests/test_resample.py measures it). The same size: x itself."""
    size = (int(size[0]), int(size[1]))
    if filter not in KERNELS:
        raise ValueError(f"unknown resampling filter {filter!r}; choose from {', '.join(FILTERS)}")
    if size[1] != x.shape[-1]:  # columns first, as Pillow
        x = quantise(_resample_axis(x.transpose(-1, -2), size[1], filter).transpose(-1, -2), half_up=True)
    if size[0] != x.shape[-2]:
        x = quantise(_resample_axis(x, size[0], filter), half_up=True)
    return x


#: output rows per matrix product in `_resample_axis`: the resampling matrix is a band, so each block of outputs
#: needs only a slice of the input (at 1,600 px a dense product does about 20× the multiplications)
BLOCK = 64


def _resample_axis(x: torch.Tensor, n_out: int, filter: str) -> torch.Tensor:
    """(..., n_in, W) → (..., n_out, W): `pillow_weights` applied along dimension −2, BLOCK outputs at a time, each
    block against the slice of input rows its window reaches (found on the host, as Pillow's window: no device
    read)."""
    n_in = x.shape[-2]
    weights = pillow_weights(n_in, n_out, filter, x.device, x.dtype)
    scale = n_in / n_out
    support = KERNELS[filter][1] * max(scale, 1.0)
    spans = []
    for start in range(0, n_out, BLOCK):
        stop = min(start + BLOCK, n_out)
        low = max(math.floor((start + 0.5) * scale - support + 0.5), 0)
        high = min(math.floor((stop - 0.5) * scale + support + 0.5), n_in)
        spans.append((start, stop, low, high))
    return _BandProduct.apply(x, weights, tuple(spans))


class _BandProduct(torch.autograd.Function):
    """weights (n_out, n_in) @ x (..., n_in, W) for a band matrix, block by block. Its own backward accumulates each
    block's gradient into one tensor: autograd's, through slices, fills a full-size zero tensor per block (25 per
    axis at 1,600 px), which more than doubled the time of a 4× round trip with resampling on a CPU."""

    @staticmethod
    def forward(ctx, x, weights, spans):
        ctx.save_for_backward(weights)
        ctx.spans, ctx.shape = spans, x.shape
        return torch.cat([weights[a:b, lo:hi] @ x[..., lo:hi, :] for a, b, lo, hi in spans], -2)

    @staticmethod
    def backward(ctx, grad):
        (weights,) = ctx.saved_tensors
        grad_x = grad.new_zeros(ctx.shape)
        for a, b, lo, hi in ctx.spans:
            grad_x[..., lo:hi, :] += weights[a:b, lo:hi].T @ grad[..., a:b, :]
        return grad_x, None, None


def scaled(size: tuple[int, int], factor: float) -> tuple[int, int]:
    """(h, w) × factor, each side rounded to whole pixels, at least 1 (augment.forwarding.scaled_side)."""
    return max(1, round(size[0] * factor)), max(1, round(size[1] * factor))


class PlatformResampling(nn.Module):
    """The pair the scanner reads after stamp.py, a platform's resampling and scan.py's working-size step.

    forward(x (B,3,H,W) in [0,1]) → (B,3,h,w) in [0,1]: one draw per batch (a batch has one size) of a photo size p
    from `photo_sizes`, a factor f from `factors` (those with p·f ≤ MAX_FILE) and a filter from `filters`, each
    uniform, from torch's CPU generator (no device synchronisation; repeatable under torch.manual_seed), then
    `apply(x, p, f, filter)`. Differentiable with respect to x (8-bit rounding passes the gradient straight through).
    """

    def __init__(self, factors=FACTORS, photo_sizes=PHOTO_SIZES, filters=FILTERS):
        super().__init__()
        if not factors or min(factors) <= 0:
            raise ValueError(f"resampling factors must be positive, got {factors}")
        if not photo_sizes or min(photo_sizes) <= 0 or min(photo_sizes) * min(factors) > MAX_FILE:
            raise ValueError(f"photo sizes must be positive and allow a file of at most {MAX_FILE:g}× the crop, got "
                             f"{photo_sizes}")
        unknown = [f for f in filters if f not in FILTERS]
        if unknown or not filters:
            raise ValueError(f"unknown resampling filter {', '.join(map(repr, unknown)) or '(none)'}; choose from "
                             f"{', '.join(FILTERS)}")
        self.factors, self.photo_sizes, self.filters = tuple(factors), tuple(photo_sizes), tuple(filters)

    @staticmethod
    def _pick(options):
        # one CPU draw from torch's generator, floored onto the options: each has chance 1/len
        return options[min(int(float(torch.rand(())) * len(options)), len(options) - 1)]

    def draw(self) -> tuple[float, float, str]:
        """(photo size p, factor f, filter) for the next batch."""
        p = self._pick(self.photo_sizes)
        f = self._pick([f for f in self.factors if p * f <= MAX_FILE])
        return p, f, self._pick(self.filters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x, *self.draw())

    @staticmethod
    def apply(x: torch.Tensor, photo_size: float, factor: float, filter: str) -> torch.Tensor:
        """x (B,3,H,W), the crops at the working size → what scan.py's scanner reads (B,3,h,w), for a photo of
        `photo_size` × the working size resampled by the platform by `factor` with `filter`:

        photo = up(x) when photo_size > 1 (stamp.py's round trip), its 8-bit file; the platform's resize and its
        8-bit file (factor ≠ 1); scan.py's to_working with the working size max(H, W)/min(photo_size, 1)."""
        size = tuple(x.shape[-2:])
        working = round(max(size) / min(photo_size, 1.0))
        if photo_size > 1:
            x = upsample_residual(x, scaled(size, photo_size))  # = up(x) + up(δ): stamp.py's photo + residual
        x = quantise(x)  # the stamped file: stamp.py writes round(255·x')
        if factor != 1:
            x = resize(x, scaled(tuple(x.shape[-2:]), factor), filter)  # the platform's 8-bit file
        return to_working(x, working)

    def output_sides(self, side: int) -> list[int]:
        """The sides the scanner reads a square crop of `side` px at, over every draw: the shapes cuDNN will see."""
        sides = set()
        for p in self.photo_sizes:
            for f in self.factors:
                if p * f <= MAX_FILE:
                    file_side = scaled((side, side), p)[0] if p > 1 else side
                    file_side = scaled((file_side, file_side), f)[0]
                    sides.add(min(file_side, round(side / min(p, 1.0))))
        return sorted(sides)

    def extra_repr(self):
        return f"factors={self.factors}, photo_sizes={self.photo_sizes}, filters={self.filters}"


__all__ = ["FACTORS", "FILTERS", "MAX_FILE", "PHOTO_SIZES", "PlatformResampling", "pillow_weights", "quantise",
           "resize"]
