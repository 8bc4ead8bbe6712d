"""The corruptions a forwarded photo meets, one `nn.Module` each.

Contract shared by every corruption (`Corruption.forward(x, strength=None)`):

- x: (B,3,H,W) floating point in [0,1], any H and W. The output has the same shape, dtype and device, in [0,1].
- strength: None (= 1, the full range), a number, or a (B,) tensor, each in [0,1]. Every sample draws its own
  random parameters from the module's ranges, and strength s moves them from the identity towards that draw:
  `parameter = identity + s·(U(lo, hi) − identity)`. A sample with strength 0 is returned unchanged, exactly
  (so the stochastic chain switches a corruption off per sample by giving it strength 0).
- Differentiable with respect to x. Real JPEG (Pillow) is not, so its gradient is the straight-through
  (identity) one: BPDA (Athalye et al., 2018), which also lets attacks see through it.
- Random draws use torch's global generator on x's device: torch.manual_seed (and the RNG state a training
  checkpoint restores) makes them repeatable.

kornia does the image operations. What it lacks and is written here: per-sample disk (defocus) kernels, and
per-sample kernel sizes and output sizes (kornia's blur takes one kernel size per batch and its resize one
output size per batch).
"""
from __future__ import annotations

import io
import math

import kornia
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from engine.device import constant
from engine.losses import rgb_to_yuv, yuv_to_rgb

Range = tuple[float, float]


def _as_range(name: str, value, low: float = -math.inf, high: float = math.inf) -> Range:
    lo, hi = (value, value) if isinstance(value, (int, float)) else value
    lo, hi = float(lo), float(hi)
    if not (low <= lo <= hi <= high):
        raise ValueError(f"{name} must be a range (lo, hi) with {low} <= lo <= hi <= {high}, got {value}")
    return lo, hi


class Corruption(nn.Module):
    """Base class: validates the input and the strength, draws nothing itself, keeps strength-0 samples."""

    #: the registry name (augment.registry.CORRUPTIONS)
    name: str = ""
    #: Draw one set of random parameters per call, shared by the whole batch, as the original code's torchvision
    #: transforms do (augment.original); False (the default) draws them per sample.
    per_batch: bool = False

    def forward(self, x: torch.Tensor, strength: float | torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x, type(self).__name__)
        return self._apply(x, self._strength(strength, x))

    @staticmethod
    def _check_input(x: torch.Tensor, who: str) -> None:
        if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(f"{who} expects a float (B,3,H,W) batch, got {tuple(x.shape)} {x.dtype}")

    def _apply(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """forward without the checks, for a chain that checked x and s (B,) itself (the check of a strength
        tensor reads it on the host)."""
        y = self.corrupt(x, s).clamp(0, 1).to(x.dtype)
        return torch.where(s.view(-1, 1, 1, 1) > 0, y, x)

    def corrupt(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """x (B,3,H,W), s (B,) in [0,1] in x's dtype → the corrupted batch (clamped by the caller)."""
        raise NotImplementedError

    @staticmethod
    def _strength(strength, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if strength is None:
            return x.new_ones(b)
        if isinstance(strength, (int, float)):  # checked and filled on the host: no copy to the device
            if not 0 <= strength <= 1:
                raise ValueError(f"strength must lie in [0, 1], got {strength}")
            return x.new_full((b,), float(strength))
        s = torch.as_tensor(strength, dtype=x.dtype, device=x.device)
        if s.ndim == 0:
            s = s.expand(b)
        if s.shape != (b,):
            raise ValueError(f"strength must be a number or a ({b},) tensor, got shape {tuple(s.shape)}")
        if not torch.compiler.is_compiling() and x.device.type == "cpu" and not bool(((s >= 0) & (s <= 1)).all()):
            raise ValueError(f"strength must lie in [0, 1], got {s.tolist()}")
        return s

    def _rand(self, like: torch.Tensor) -> torch.Tensor:
        """U(0, 1) draws shaped like `like` ((B,) or (B, ...)), in its dtype and device: one per element, or with
        `per_batch` one per element of the first sample, repeated over the batch."""
        if not self.per_batch:
            return torch.rand(like.shape, dtype=like.dtype, device=like.device)
        return torch.rand((1, *like.shape[1:]), dtype=like.dtype, device=like.device).expand(like.shape)

    def _uniform(self, rng: Range, like: torch.Tensor) -> torch.Tensor:
        """(B,) draws from U(lo, hi), in the dtype and device of `like` (B,)."""
        lo, hi = rng
        return lo + (hi - lo) * self._rand(like)

    def _sign(self, like: torch.Tensor) -> torch.Tensor:
        return (self._rand(like) < 0.5).to(like.dtype) * 2 - 1


class Rotation(Corruption):
    """Rotation about the centre by ±U(degrees) (random sign); corners are filled per `padding_mode`."""

    name = "rotation"

    def __init__(self, degrees: Range = (0.0, 30.0), padding_mode: str = "zeros"):
        super().__init__()
        self.degrees = _as_range("degrees", degrees, 0, 180)
        self.padding_mode = padding_mode

    def corrupt(self, x, s):
        angle = s * self._sign(s) * self._uniform(self.degrees, s)
        return kornia.geometry.transform.rotate(x, angle, padding_mode=self.padding_mode)

    def extra_repr(self):
        return f"degrees={self.degrees}, padding_mode={self.padding_mode!r}"


class ResizedCrop(Corruption):
    """A random crop covering `scale` of the area with aspect ratio in `ratio`, resized back to the input size."""

    name = "crop"

    def __init__(self, scale: Range = (0.7, 1.0), ratio: Range = (3 / 4, 4 / 3)):
        super().__init__()
        self.scale = _as_range("scale", scale, 0.01, 1)
        self.ratio = _as_range("ratio", ratio, 0.1, 10)

    def corrupt(self, x, s):
        h, w = x.shape[-2:]
        area = 1 - s * (1 - self._uniform(self.scale, s))
        log_ratio = s * self._uniform((math.log(self.ratio[0]), math.log(self.ratio[1])), s)
        cw = (torch.sqrt(area * log_ratio.exp()) * w).clamp(1, w)
        ch = (torch.sqrt(area / log_ratio.exp()) * h).clamp(1, h)
        x0 = self._rand(s) * (w - cw)
        y0 = self._rand(s) * (h - ch)
        # kornia's crop_and_resize, as the affine map of the box (x0, y0)-(x0+cw-1, y0+ch-1) onto the output
        # (0, 0)-(w-1, h-1): crop_and_resize builds its corner tensors from Python data on every call
        sx, sy = (w - 1) / (cw - 1), (h - 1) / (ch - 1)
        zero = torch.zeros_like(sx)
        matrix = torch.stack([torch.stack([sx, zero, -sx * x0], -1), torch.stack([zero, sy, -sy * y0], -1)], 1)
        return kornia.geometry.transform.crop_by_transform_mat(x, matrix, (h, w))

    def extra_repr(self):
        return f"scale={self.scale}, ratio=({self.ratio[0]:.3g}, {self.ratio[1]:.3g})"


class ColorJitter(Corruption):
    """Brightness, contrast and saturation factors 1 ± U(0, ·) (torchvision's semantics, kornia's functions),
    then a hue shift of ± U(0, hue) turns as a rotation of the YUV chroma plane, in that order."""

    name = "jitter"

    def __init__(self, brightness: float = 0.3, contrast: float = 0.3, saturation: float = 0.3, hue: float = 0.3):
        super().__init__()
        self.brightness = _as_range("brightness", brightness, 0, 1)[1]
        self.contrast = _as_range("contrast", contrast, 0, 1)[1]
        self.saturation = _as_range("saturation", saturation, 0, 1)[1]
        self.hue = _as_range("hue", hue, 0, 0.5)[1]

    def corrupt(self, x, s):
        def factor(amount):
            return 1 + s * self._uniform((-amount, amount), s)

        e = kornia.enhance
        x = e.adjust_brightness_accumulative(x, factor(self.brightness))
        x = e.adjust_contrast_with_mean_subtraction(x, factor(self.contrast))
        x = e.adjust_saturation_with_gray_subtraction(x, factor(self.saturation))
        return self._rotate_hue(x.clamp(0, 1), 2 * math.pi * s * self._uniform((-self.hue, self.hue), s))

    @staticmethod
    def _rotate_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
        """Hue shift as a rotation of the chroma plane (U, V) in YUV, keeping luma Y.

        kornia's adjust_hue goes through HSV, whose hue divides by max − min: on near-grey pixels its gradient
        is NaN, and one such pixel turned a train_rs_aug.py run's weights to NaN (measured: step 600 of the
        CPU demo). The YUV rotation is smooth everywhere, and equal to HSV's shift up to the usual
        perceptual-vs-hexagonal hue difference.
        """
        yuv = rgb_to_yuv(x)  # kornia's, with its matrix kept on the device
        cos, sin = angle.cos().view(-1, 1, 1), angle.sin().view(-1, 1, 1)
        u, v = yuv[:, 1], yuv[:, 2]
        rotated = torch.stack([yuv[:, 0], cos * u - sin * v, sin * u + cos * v], 1)
        return yuv_to_rgb(rotated)

    def extra_repr(self):
        return (f"brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation}, "
                f"hue={self.hue}")


def _odd_sizes(kernel_size: Range, uniform01: torch.Tensor) -> torch.Tensor:
    """(B,) odd kernel sizes drawn uniformly from the odd numbers in kernel_size, given (B,) U(0,1) draws."""
    lo, hi = int(kernel_size[0]) // 2, int(kernel_size[1]) // 2
    return 2 * (lo + (uniform01 * (hi - lo + 1)).long().clamp(max=hi - lo)) + 1


def _window(kernels: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Zero each (B,k,k) kernel outside its centred heights[i]×widths[i] window and renormalise to sum 1."""
    k = kernels.shape[-1]
    offset = (torch.arange(k, device=kernels.device) - k // 2).abs()
    rows = offset[None, :] <= heights[:, None] // 2
    cols = offset[None, :] <= widths[:, None] // 2
    kernels = kernels * (rows[:, :, None] & cols[:, None, :])
    return kernels / kernels.sum((1, 2), keepdim=True)


class GaussianBlur(Corruption):
    """Gaussian blur with σ = U(sigma) and a square kernel whose odd side is drawn per sample from `kernel_size`,
    or, with `kernel_hw`, a fixed kernel of that (height, width): torchvision's GaussianBlur(kernel_size=(w, h)),
    which the original code uses with (3, 7), i.e. 7 tall and 3 wide."""

    name = "gaussian_blur"

    def __init__(self, kernel_size: Range = (3, 7), sigma: Range = (1.0, 3.0),
                 kernel_hw: tuple[int, int] | None = None):
        super().__init__()
        self.kernel_size = tuple(int(k) for k in _as_range("kernel_size", kernel_size, 1, 63))
        self.sigma = _as_range("sigma", sigma, 0, 50)
        if kernel_hw is not None and not all(int(k) == k and k % 2 == 1 and 1 <= k <= 63 for k in kernel_hw):
            raise ValueError(f"kernel_hw must be two odd sizes in [1, 63], got {kernel_hw}")
        self.kernel_hw = None if kernel_hw is None else (int(kernel_hw[0]), int(kernel_hw[1]))

    def corrupt(self, x, s):
        sigma = (s * self._uniform(self.sigma, s)).clamp_min(1e-3)
        if self.kernel_hw is None:
            heights = widths = _odd_sizes(self.kernel_size, self._rand(s))
            kmax = 2 * (self.kernel_size[1] // 2) + 1
        else:
            heights, widths = (torch.full(s.shape, k, device=s.device) for k in self.kernel_hw)
            kmax = max(self.kernel_hw)
        kernels = kornia.filters.get_gaussian_kernel2d(kmax, sigma[:, None].expand(-1, 2))
        kernels = _window(kernels.to(x.dtype), heights, widths)
        return kornia.filters.filter2d(x, kernels, border_type="reflect")

    def extra_repr(self):
        shape = f"kernel_hw={self.kernel_hw}" if self.kernel_hw else f"kernel_size={self.kernel_size}"
        return f"{shape}, sigma={self.sigma}"


class DefocusBlur(Corruption):
    """Defocus: a disk kernel of radius U(radius) px softened by a Gaussian of σ = alias_blur, as in
    ImageNet-C (Hendrycks & Dietterich, 2019), whose severities 1–5 are radius 3, 4, 6, 8, 10."""

    name = "defocus"

    def __init__(self, radius: Range = (1.0, 3.0), alias_blur: float = 0.5):
        super().__init__()
        self.radius = _as_range("radius", radius, 0, 30)
        self.alias_blur = _as_range("alias_blur", alias_blur, 0, 5)[1]

    def corrupt(self, x, s):
        # kornia has no disk kernel: build one per sample (ImageNet-C's `disk`, without OpenCV).
        radius = s * self._uniform(self.radius, s)
        half = math.ceil(self.radius[1] + 3 * self.alias_blur)
        grid = torch.arange(-half, half + 1, dtype=x.dtype, device=x.device)
        dist2 = grid[None, :, None] ** 2 + grid[None, None, :] ** 2
        disks = (dist2 <= radius.view(-1, 1, 1) ** 2).to(x.dtype)  # the centre pixel is always in: never empty
        if self.alias_blur > 0:
            sigma = (s * self.alias_blur).clamp_min(1e-3)[:, None].expand(-1, 2)
            alias = kornia.filters.get_gaussian_kernel2d(2 * half + 1, sigma).to(x.dtype)
            disks = kornia.filters.filter2d(disks[:, None], alias, border_type="constant")[:, 0]
        disks = disks / disks.sum((1, 2), keepdim=True)
        return kornia.filters.filter2d(x, disks, border_type="reflect")

    def extra_repr(self):
        return f"radius={self.radius}, alias_blur={self.alias_blur}"


class Perspective(Corruption):
    """Perspective warp: each corner moves inwards by up to d·(W/2, H/2), d = U(distortion), as in kornia's
    RandomPerspective; the uncovered area is filled per `padding_mode`."""

    name = "perspective"

    def __init__(self, distortion: Range = (0.0, 0.1), padding_mode: str = "zeros"):
        super().__init__()
        self.distortion = _as_range("distortion", distortion, 0, 1)
        self.padding_mode = padding_mode

    def corrupt(self, x, s):
        h, w = x.shape[-2:]
        # constants kept on the device: a tensor from Python data is a blocking host-to-device copy per call
        corners = constant(((0, 0), (w - 1, 0), (w - 1, h - 1), (0, h - 1)), x.device, x.dtype).expand(x.shape[0], 4, 2)
        inwards = constant(((w / 2, h / 2), (-w / 2, h / 2), (-w / 2, -h / 2), (w / 2, -h / 2)), x.device, x.dtype)
        d = (s * self._uniform(self.distortion, s)).view(-1, 1, 1)
        moved = corners + inwards * d * self._rand(corners)
        matrix = kornia.geometry.transform.get_perspective_transform(corners, moved)
        return kornia.geometry.transform.warp_perspective(x, matrix, (h, w), padding_mode=self.padding_mode)

    def extra_repr(self):
        return f"distortion={self.distortion}, padding_mode={self.padding_mode!r}"


class GaussianNoise(Corruption):
    """Additive pixel noise N(0, σ²), σ = U(std), clipped to [0,1] (unlike the smoothing noise, which is not)."""

    name = "noise"

    def __init__(self, std: Range = (0.01, 0.05)):
        super().__init__()
        self.std = _as_range("std", std, 0, 1)

    def corrupt(self, x, s):
        std = s * self._uniform(self.std, s)
        return x + std.view(-1, 1, 1, 1) * torch.randn_like(x)

    def extra_repr(self):
        return f"std={self.std}"


class DownUpResize(Corruption):
    """Anti-aliased bilinear down-scaling by a factor U(scale) per side, then back up to the input size, as a
    platform's thumbnailer or a re-upload at lower resolution does."""

    name = "resize"

    def __init__(self, scale: Range = (0.5, 1.0)):
        super().__init__()
        self.scale = _as_range("scale", scale, 0.05, 1)

    def corrupt(self, x, s):
        # kornia and torch resize a batch to one size; each sample here has its own. Sampling the small image
        # into the top-left corner of an H×W canvas and reading it back with per-sample grids keeps it batched.
        b, _, h, w = x.shape
        factor = 1 - s * (1 - self._uniform(self.scale, s))
        small_h, small_w = (factor * h).round().clamp_min(1), (factor * w).round().clamp_min(1)
        rows = torch.arange(h, dtype=x.dtype, device=x.device)
        cols = torch.arange(w, dtype=x.dtype, device=x.device)

        def sample(image, src_h, src_w, dst_h, dst_w):
            # pixel-centre mapping of a dst_h×dst_w image onto a src_h×src_w one (both in the top-left corner)
            ys = ((rows + 0.5) * (src_h / dst_h)[:, None] - 0.5).clamp(min=0).minimum(src_h[:, None] - 1)
            xs = ((cols + 0.5) * (src_w / dst_w)[:, None] - 0.5).clamp(min=0).minimum(src_w[:, None] - 1)
            grid = torch.stack([(2 * xs / max(w - 1, 1) - 1)[:, None, :].expand(b, h, w),
                                (2 * ys / max(h - 1, 1) - 1)[:, :, None].expand(b, h, w)], -1)
            return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)

        # Anti-alias first, as Pillow and skimage do: a Gaussian of σ = (1/factor − 1)/2 (skimage's rescale).
        sigma = ((1 / factor - 1) / 2).clamp_min(1e-3)[:, None].expand(-1, 2)
        ksize = 2 * math.ceil(3 * (1 / self.scale[0] - 1) / 2) + 1
        if ksize > 1:
            x = kornia.filters.filter2d(x, kornia.filters.get_gaussian_kernel2d(ksize, sigma).to(x.dtype),
                                        border_type="reflect")
        full_h, full_w = torch.full_like(s, h), torch.full_like(s, w)
        return sample(sample(x, full_h, full_w, small_h, small_w), small_h, small_w, full_h, full_w)

    def extra_repr(self):
        return f"scale={self.scale}"


class Shift(Corruption):
    """Translation by (dx, dy), each ±U(pixels) per sample with its own random sign (kornia `translate`, bilinear):
    whole pixels move the stamp to another phase of the pixel grid (a crop by a few rows does that, and strided
    convolutions read each phase differently), fractions of a pixel interpolate it (a resampling's half-pixel offset
    does that). The uncovered strip is filled per `padding_mode` ('reflection': no black border to read)."""

    name = "shift"

    def __init__(self, pixels: Range = (0.0, 16.0), padding_mode: str = "reflection"):
        super().__init__()
        self.pixels = _as_range("pixels", pixels, 0, 1024)
        self.padding_mode = padding_mode

    def corrupt(self, x, s):
        shift = torch.stack([s * self._sign(s) * self._uniform(self.pixels, s) for _ in range(2)], -1)  # (B,2): dx, dy
        return kornia.geometry.transform.translate(x, shift, padding_mode=self.padding_mode, align_corners=True)

    def extra_repr(self):
        return f"pixels={self.pixels}, padding_mode={self.padding_mode!r}"


class JPEG(Corruption):
    """JPEG compression at quality U(quality) (1–100), per sample.

    mode "differentiable": kornia's `jpeg_codec_differentiable` (Reich et al., 2024), for training.
    mode "real": Pillow's libjpeg encode/decode of the 8-bit image, 4:2:0 as Pillow's default, for
    evaluation; its gradient is the identity (BPDA).
    """

    name = "jpeg"
    MODES = ("differentiable", "real")

    def __init__(self, quality: Range = (50.0, 100.0), mode: str = "differentiable"):
        super().__init__()
        self.quality = _as_range("quality", quality, 1, 100)
        if mode not in self.MODES:
            raise ValueError(f"JPEG mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode

    def corrupt(self, x, s):
        quality = 100 - s * (100 - self._uniform(self.quality, s))
        if self.mode == "differentiable":
            # kornia forces two host-device syncs per call here: it checks the quality's range with amin().item()
            # and amax().item() (skipped only under torch.compile)
            return kornia.enhance.jpeg_codec_differentiable(x, quality)
        return pillow_jpeg(x.detach(), quality) + (x - x.detach())  # exact values, identity gradient

    def extra_repr(self):
        return f"quality={self.quality}, mode={self.mode!r}"


class RealCodec(Corruption):
    """A real lossy codec per image: libjpeg (4:2:0, Pillow's default) or libwebp (lossy, method 4) through Pillow at
    quality U(quality), the format drawn per image from `formats`; strength s moves the quality from 100 towards the
    draw. Its gradient is the identity (straight-through, as JPEG's "real" mode): the forward pass is what a platform
    sends, the backward pass what the differentiable corruptions around it give.

    It reads the batch back to the host (on a GPU the step waits for it: three reads per call) and runs a CPU codec
    for each image, so the stochastic chain's 'all' leaves it out (augment.registry.OPT_IN): name it to use it."""

    name = "codec"
    FORMATS = ("jpeg", "webp")

    def __init__(self, quality: Range = (50.0, 95.0), formats: tuple[str, ...] = FORMATS):
        super().__init__()
        self.quality = _as_range("quality", quality, 1, 100)
        formats = tuple(formats)
        if not formats or any(f not in self.FORMATS for f in formats):
            raise ValueError(f"codec formats must be some of {self.FORMATS}, got {formats}")
        self.formats = formats

    def corrupt(self, x, s):
        quality = 100 - s * (100 - self._uniform(self.quality, s))
        pick = (self._rand(s) * len(self.formats)).long().clamp(max=len(self.formats) - 1)
        out = []
        # the host reads (see the docstring): the batch in one copy, then the qualities and formats
        for image, q, k in zip(x.detach().float().cpu(), quality.tolist(), pick.tolist()):
            options = dict(quality=int(round(q)), lossless=False) if self.formats[k] == "webp" else \
                dict(quality=int(round(q)))
            out.append(torch.from_numpy(encode_decode(to_pixels(image), self.formats[k].upper(), **options)))
        decoded = torch.stack(out).permute(0, 3, 1, 2).to(x.device, x.dtype) / 255
        return decoded + (x - x.detach())  # exact values, identity gradient

    def extra_repr(self):
        return f"quality={self.quality}, formats={self.formats}"


def to_pixels(image: torch.Tensor) -> np.ndarray:
    """One image (3,H,W) in [0,1] → (H,W,3) uint8, round(255·clamp(x, 0, 1)): the 8-bit file a photo is saved as
    (stamp.py writes a stamped photo the same way). Every real codec here (pillow_jpeg, augment.forwarding)
    encodes these pixels."""
    return (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def encode_decode(pixels: np.ndarray, format: str, **options) -> np.ndarray:
    """(H,W,3) uint8 → the same image saved in `format` with Pillow's `options` and read back, (H,W,3) uint8: the
    one real-codec round trip (pillow_jpeg here, augment.forwarding's codecs)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=format, **options)
    buffer.seek(0)
    with Image.open(buffer) as image:
        return np.asarray(image.convert("RGB")).copy()


def pillow_jpeg(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """Real JPEG round trip with Pillow: x (B,3,H,W) in [0,1], quality (B,) → decoded batch, same dtype/device."""
    out = [torch.from_numpy(encode_decode(to_pixels(image), "JPEG", quality=int(round(q)))).permute(2, 0, 1)
           for image, q in zip(x.float().cpu(), quality.tolist())]
    return (torch.stack(out).to(x.device, x.dtype)) / 255
