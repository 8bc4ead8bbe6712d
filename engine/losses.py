"""The paper's losses: residual regularisation L_rr, perceptual L_ps (LPIPS), anti-forwarding L_A; and ours, the
flat-weighted image loss L_flat (perceptual shaping, docs/method.md)."""
from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass

import kornia
import torch
import torch.nn.functional as F

from models.jnd import jnd_map

from .device import constant

#: StegaStamp's YUV weights: chroma changes are far more visible per unit than luma changes.
YUV_WEIGHTS = (1.0, 100.0, 100.0)


@functools.lru_cache(maxsize=None)
def _colour_matrix(name: str) -> tuple:
    """kornia's 3×3 matrix of kornia.color.<name> (rgb_to_yuv or yuv_to_rgb), read off the identity in float64."""
    columns = getattr(kornia.color, name)(torch.eye(3, dtype=torch.float64).view(3, 3, 1, 1))[:, :, 0, 0]
    return tuple(map(tuple, columns.T.tolist()))


def _linear_colour(image: torch.Tensor, name: str) -> torch.Tensor:
    """kornia.color.<name>(image) for (B,3,H,W), with its matrix made once per device and dtype: kornia builds the
    matrix from Python data on every call, a blocking host-to-device copy on a GPU."""
    kernel = constant(_colour_matrix(name), image.device, image.dtype)
    if image.device.type == "cpu":  # kornia's choice too: einsum on CPU, a 1×1 convolution elsewhere
        return torch.einsum("oi,...ihw->...ohw", kernel, image).contiguous()
    return F.conv2d(image, kernel.view(3, 3, 1, 1))


def rgb_to_yuv(image: torch.Tensor) -> torch.Tensor:
    """kornia.color.rgb_to_yuv of (B,3,H,W) RGB in [0,1], without a host-to-device copy per call."""
    return _linear_colour(image, "rgb_to_yuv")


def yuv_to_rgb(image: torch.Tensor) -> torch.Tensor:
    """kornia.color.yuv_to_rgb (its exact inverse) of (B,3,H,W) YUV, without a host-to-device copy per call."""
    return _linear_colour(image, "yuv_to_rgb")


def yuv_mse(stamped: torch.Tensor, original: torch.Tensor, weights=YUV_WEIGHTS) -> torch.Tensor:
    """Σ_c w_c · mean((YUV(x') - YUV(x))_c²), both (B,3,H,W) in [0,1] → scalar."""
    diff = rgb_to_yuv(stamped) - rgb_to_yuv(original)
    per_channel = diff.pow(2).mean(dim=(0, 2, 3))
    # the weights kept on the device: a tensor from Python data would be a host-to-device copy in every step
    return (per_channel * constant(tuple(map(float, weights)), per_channel.device, per_channel.dtype)).sum()


def residual_regularisation(stamped, original, unbounded_residual, l1_weight: float,
                            yuv_weights=YUV_WEIGHTS) -> torch.Tensor:
    """L_rr: YUV-weighted MSE between x' and x (weights (Y, U, V)) plus l1_weight · mean |u|.

    u is the residual before the encoder's bound δ = m·tanh(u/m) (StampEncoder.bound; u = δ when unbounded, as in
    the original, and u ≈ δ wherever |δ| ≪ m). The L1 term on u keeps a gradient where tanh has none: with the
    term on δ, a residual pushed into tanh's flat tails feels no pull back, Adam scales the vanishing gradients
    up to full-size steps, and the encoder can die at δ = ±m everywhere (a uniform brightness shift that the
    scanner cannot tell from a darker photo: seen in a 3,000-step demo run, 26 dB and 60% accuracy for good).
    """
    return yuv_mse(stamped, original, yuv_weights) + l1_weight * unbounded_residual.abs().mean()


def flat_weights(original: torch.Tensor) -> torch.Tensor:
    """Per-pixel weights of the flat-weighted image loss: ĵ(x)^−2 (models.jnd.jnd_map of the clean photo x,
    (B,3,H,W) in [0,1]), normalised to mean 1 over each photo → (B,1,H,W) fp32, no gradient.

    ĵ^−2 counts an error in units of the local just-noticeable difference, squared: a flat mid-grey pixel (ĵ = 0.25)
    weighs 16 times a textured one (ĵ = 1). The mean-1 normalisation keeps the term's size that of the plain MSE
    for a residual spread evenly over the photo, so that it moves the stamp's energy out of flat regions rather
    than shrinking the stamp as a whole."""
    w = jnd_map(original).pow(-2)
    return w / w.mean(dim=(2, 3), keepdim=True)


def flat_weighted_mse(stamped: torch.Tensor, original: torch.Tensor, weights=YUV_WEIGHTS) -> torch.Tensor:
    """L_flat: Σ_c w_c · mean(W · (YUV(x') − YUV(x))_c²), W = flat_weights(x): the YUV-weighted MSE of L_rr with
    each pixel weighed by how visible a change is there (flat mid-tones most). Both (B,3,H,W) in [0,1] → scalar."""
    diff = rgb_to_yuv(stamped) - rgb_to_yuv(original)
    per_channel = (flat_weights(original) * diff.pow(2)).mean(dim=(0, 2, 3))
    return (per_channel * constant(tuple(map(float, weights)), per_channel.device, per_channel.dtype)).sum()


def load_lpips(device, log=print):
    """LPIPS (AlexNet) as a frozen module taking [0,1] images, or None with one line saying why.

    Its AlexNet backbone comes from torchvision's download cache; without it there is no LPIPS. A random
    backbone (lpips' pnet_rand) would give a number that is not LPIPS, so we never fall back to one.
    """
    try:
        import lpips

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's 'pretrained' deprecation, from inside lpips
            model = lpips.LPIPS(net="alex", verbose=False)
    except Exception as e:  # no network, no cache, corrupt cache: all mean the same to the user
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        log(f"LPIPS unavailable, so L_ps is off and LPIPS is not reported: torchvision could not load the "
            f"AlexNet weights ({reason}). To enable it, put alexnet-owt-7be5be79.pth in "
            f"{_home_as_tilde(torch.hub.get_dir())}/checkpoints/.")
        return None
    model.eval().requires_grad_(False)
    return model.to(device)


def _home_as_tilde(path: str) -> str:
    """A path under the user's home written with ~ (it is read in model cards, which travel between machines)."""
    home = os.path.expanduser("~")
    return "~" + path[len(home):] if home != "~" and path.startswith(home + os.sep) else path


def perceptual_loss(lpips_model, stamped, original) -> torch.Tensor:
    """L_ps: mean LPIPS distance between x' and x, images in [0,1]."""
    return lpips_model(stamped, original, normalize=True).mean()


@dataclass
class View:
    """One batch that the scanner is trained to classify: `images` (2B,3,H,W) = some transform of [x, x'],
    labelled [0]*B + [1]*B, contributing `weight` · cross-entropy to L_A."""

    name: str
    images: torch.Tensor
    weight: float = 1.0


def pair_labels(batch_size: int, device) -> torch.Tensor:
    """Labels of the stacked pair [x, x']: B zeros (clean) then B ones (stamped)."""
    # Made on the device: no host-to-device copy in every training step.
    return (torch.arange(2 * batch_size, device=device) >= batch_size).long()
