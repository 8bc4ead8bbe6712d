"""Stamp-and-scan measurements shared by validation, the end-of-run summary and evaluate.py."""
from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchvision.utils import save_image

from models import CLEAN, STAMPED

from .device import full_precision
from .losses import pair_labels

#: SSIM's 11-px Gaussian window needs at least this many pixels per side.
MIN_SSIM_SIDE = 11


def border_energy_ratio(residual: torch.Tensor, band: int = 4) -> torch.Tensor:
    """How much more residual energy sits along the worst border than inside the image.

    residual (B,3,H,W) → (B,): max over the four sides of mean δ² in a `band`-px strip divided by mean δ²
    in the interior. ≈1 for a stamp spread evenly; ≫1 for the border-stripe shortcut that zero padding
    invites (see StampEncoderConfig.padding_mode). NaN for images too small to have an interior.
    """
    energy = residual.float().pow(2).mean(1)  # (B,H,W)
    h, w = energy.shape[-2:]
    if h <= 4 * band or w <= 4 * band:
        return torch.full((energy.shape[0],), float("nan"), device=residual.device)
    interior = energy[:, 2 * band:-2 * band, 2 * band:-2 * band].mean((1, 2)).clamp_min(1e-20)
    sides = torch.stack([energy[:, :band].mean((1, 2)), energy[:, -band:].mean((1, 2)),
                         energy[:, :, :band].mean((1, 2)), energy[:, :, -band:].mean((1, 2))], 1)
    return sides.amax(1) / interior


@torch.no_grad()
def stamp_and_scan(encoder, scanner, x: torch.Tensor) -> dict:
    """x (B,3,H,W) in [0,1] → per-image tensors: residual, stamped, logits of the clean and stamped images,
    PSNR (dB), SSIM, border energy ratio. In fp32 on every device, even inside autocast (see full_precision)."""
    with full_precision(x.device):
        residual = encoder(x).float()
    stamped = (x + residual).clamp(0, 1)
    with full_precision(x.device):
        logits = scanner(torch.cat([x, stamped])).float()
    b = x.shape[0]
    psnr = peak_signal_noise_ratio(stamped, x, data_range=1.0, reduction="none", dim=(1, 2, 3))
    if min(x.shape[-2:]) >= MIN_SSIM_SIDE:
        ssim = structural_similarity_index_measure(stamped, x, data_range=1.0, reduction="none")
    else:
        ssim = torch.full((b,), float("nan"), device=x.device)
    return {"residual": residual, "stamped": stamped, "clean_logits": logits[:b], "stamped_logits": logits[b:],
            "psnr": psnr, "ssim": ssim.reshape(b), "border_ratio": border_energy_ratio(residual)}


@torch.no_grad()
def evaluate(encoder, scanner, loader, device, max_images: int | None = None, views=None, step: int = 0) -> dict:
    """Mean PSNR/SSIM/border ratio and clean/stamped/overall accuracy over a loader of [0,1] images.

    Accuracy is the scanner's argmax: clean images must read CLEAN, stamped ones STAMPED. With `views` (a
    training script's view function), also `acc/<view>`: the accuracy on what that script trains the scanner
    on (e.g. the noisy pair). Returns floats and n, the number of images (each counted once clean and once
    stamped for accuracy).
    """
    was_training = encoder.training, scanner.training
    encoder.eval(), scanner.eval()
    sums = {"psnr": 0.0, "ssim": 0.0, "border_ratio": 0.0, "acc_clean": 0.0, "acc_stamped": 0.0}
    counts = dict.fromkeys(sums, 0)
    n = 0
    for x in loader:
        if max_images is not None and n >= max_images:
            break
        if max_images is not None:
            x = x[: max_images - n]
        x = x.to(device, non_blocking=True)
        out = stamp_and_scan(encoder, scanner, x)
        per_image = {
            "psnr": out["psnr"], "ssim": out["ssim"], "border_ratio": out["border_ratio"],
            "acc_clean": (out["clean_logits"].argmax(1) == CLEAN).float(),
            "acc_stamped": (out["stamped_logits"].argmax(1) == STAMPED).float(),
        }
        for view in views(torch.cat([x, out["stamped"]]), step) if views else []:
            if view.name != "plain":  # the plain view is acc_clean / acc_stamped above
                with full_precision(x.device):
                    logits = scanner(view.images).float()
                per_image[f"acc/{view.name}"] = (logits.argmax(1) == pair_labels(x.shape[0], x.device)).float()
        for key, values in per_image.items():
            finite = values[torch.isfinite(values)]
            sums[key] = sums.get(key, 0.0) + finite.sum().item()
            counts[key] = counts.get(key, 0) + finite.numel()
        n += x.shape[0]
    encoder.train(was_training[0]), scanner.train(was_training[1])
    metrics = {k: (sums[k] / counts[k] if counts[k] else float("nan")) for k in sums}
    metrics["acc"] = (metrics["acc_clean"] + metrics["acc_stamped"]) / 2
    metrics["n"] = n
    return metrics


def amplify(residual: torch.Tensor) -> torch.Tensor:
    """Residual (B,3,H,W) → viewable image in [0,1]: mid-grey is zero, each image stretched to full contrast."""
    scale = residual.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)
    return (0.5 + 0.5 * residual / scale).clamp(0, 1)


def preview_rows(x: torch.Tensor, stamped: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) each → (3B,3,H,W): originals, stamped, amplified residuals, for a 3-row image grid."""
    return torch.cat([x, stamped, amplify(residual)]).float().cpu()


@torch.no_grad()
def save_preview(encoder, image: torch.Tensor, path) -> dict:
    """Save original | stamped | amplified residual side by side for one image (3,H,W) in [0,1].

    Returns the image's PSNR and border energy ratio, so the caller can print them beside the path.
    """
    encoder.eval()
    x = image.unsqueeze(0)
    with full_precision(x.device):
        residual = encoder(x).float()
    stamped = (x + residual).clamp(0, 1)
    save_image(torch.cat([x, stamped, amplify(residual)]).cpu(), path, nrow=3, padding=4, pad_value=1.0)
    return {"psnr": peak_signal_noise_ratio(stamped, x, data_range=1.0).item(),
            "border_ratio": border_energy_ratio(residual).item()}
