"""Corruptions by name, and the parameter ranges they train and are evaluated with."""
from __future__ import annotations

from .corruptions import (JPEG, ColorJitter, Corruption, DefocusBlur, DownUpResize, GaussianBlur, GaussianNoise,
                          Perspective, RealCodec, ResizedCrop, Rotation, Shift)

#: name → class, in the order pictures and tables show them
CORRUPTIONS: dict[str, type[Corruption]] = {c.name: c for c in (
    Rotation, ResizedCrop, ColorJitter, GaussianBlur, DefocusBlur, Perspective, GaussianNoise, DownUpResize, JPEG,
    Shift, RealCodec)}
#: corruptions that 'all' leaves out, used only when named: the real codecs read each batch back to the host (on a
#: GPU the step waits for them)
OPT_IN = ("codec",)

#: Keyword arguments of each corruption per preset. "train" covers at least the paper's training ranges
#: (crop scale 0.7–1, rotation ±30°, jitter ≤ 0.3, blur kernel 3–7 with σ 1–3, perspective 0.1, JPEG quality
#: 50–100; the paper's code draws no hue shift, we draw up to 0.1 turns) with differentiable JPEG. "eval" is
#: stronger everywhere, with the worst cases of the paper code's validation chain (crop area down to 0.4,
#: rotation 45°, jitter 0.4 including hue, perspective 0.4), and uses real (Pillow) JPEG.
PRESETS: dict[str, dict[str, dict]] = {
    "train": {
        "rotation": dict(degrees=(0, 30)),
        "crop": dict(scale=(0.7, 1.0)),
        "jitter": dict(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1),
        "gaussian_blur": dict(kernel_size=(3, 7), sigma=(1.0, 3.0)),
        "defocus": dict(radius=(1.0, 3.0), alias_blur=0.5),
        "perspective": dict(distortion=(0.0, 0.1)),
        "noise": dict(std=(0.01, 0.05)),
        "resize": dict(scale=(0.5, 1.0)),
        "jpeg": dict(quality=(50, 100), mode="differentiable"),
        "shift": dict(pixels=(0.0, 16.0)),  # 16: the grid period a stamp was seen locked to (docs/models.md)
        "codec": dict(quality=(50, 95), formats=("jpeg", "webp")),
    },
    "eval": {
        "rotation": dict(degrees=(0, 45)),
        "crop": dict(scale=(0.4, 1.0)),
        "jitter": dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.4),
        "gaussian_blur": dict(kernel_size=(3, 9), sigma=(1.0, 4.0)),
        "defocus": dict(radius=(3.0, 6.0), alias_blur=0.5),  # ImageNet-C severities 1–3
        "perspective": dict(distortion=(0.0, 0.4)),
        "noise": dict(std=(0.02, 0.1)),
        "resize": dict(scale=(0.25, 1.0)),
        "jpeg": dict(quality=(30, 90), mode="real"),
        "shift": dict(pixels=(0.0, 32.0)),
        "codec": dict(quality=(30, 90), formats=("jpeg", "webp")),
    },
}


def parse_names(text: str | list[str] | tuple[str, ...]) -> list[str]:
    """'rotation,jpeg' (or a list, or 'all': every corruption but OPT_IN's) → validated corruption names, in the
    order given."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if names == ["all"]:
        return [n for n in CORRUPTIONS if n not in OPT_IN]
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown or not names:
        raise ValueError(f"unknown corruption {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"choose from {', '.join(CORRUPTIONS)} or 'all' (all but {', '.join(OPT_IN)})")
    if len(set(names)) != len(names):
        raise ValueError(f"corruption listed twice in {','.join(names)}")
    return names


def build(name: str, preset: str = "train", **overrides) -> Corruption:
    """The corruption `name` with the ranges of `preset`, any of them replaced by `overrides`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    (name,) = parse_names([name])
    return CORRUPTIONS[name](**{**PRESETS[preset][name], **overrides})
