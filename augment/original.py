"""The original code's augmentation chains, built from our corruptions (`--aug_chain original`).

The original applies torchvision transforms to a whole batch: a fixed order (jitter → crop → blur → rotate →
perspective → JPEG), each with probability `aug_prb` per call (one coin for the batch), each drawing its random
parameters once per call for the whole batch. `FixedOrderChain` does that with our differentiable corruptions
set to `per_batch` draws. Two chains exist in the original, with different ranges:

- train_rs_aug.py (`rs_aug`): colour jitter with brightness/contrast/saturation U(0, 0.3) drawn per step (hue 0),
  resized crop scale (0.7, 1), Gaussian blur 3 wide × 7 tall with σ U(1, 3), rotation ±30°, perspective 0.1,
  differentiable JPEG at a quality drawn per step from U(50, 100).
- train.py --aug (`plain_da`, Table 1's Plain+DA): jitter 0.4 (hue 0), crop scale (0.4, 1), the same blur and
  rotation, perspective 0.4, and one JPEG quality for the whole run, drawn from U(50, 100) when the chain is built.

What differs from torchvision in details (docs/fidelity.md): bilinear rather than nearest rotation, jitter
factors applied in a fixed rather than random order, kornia's differentiable JPEG (Reich et al. 2024) rather
than DiffJPEG, and a continuous rather than integer JPEG quality.
"""
from __future__ import annotations

import torch
from torch import nn

from .corruptions import JPEG, ColorJitter, Corruption, GaussianBlur, Perspective, ResizedCrop, Rotation

KINDS = ("rs_aug", "plain_da")


class FixedOrderChain(nn.Module):
    """Applies its corruptions in their fixed order, each with probability p per call to the whole batch, with
    parameters drawn once per call (shared by the batch).

    `random_strength` names corruptions whose strength is drawn per call from U(0, 1) instead of being 1: a
    corruption's parameters scale linearly with its strength, so jitter with brightness 0.3 at strength U(0, 1)
    is the original's ColorJitter(brightness=U(0, 0.3)).
    """

    def __init__(self, corruptions: list[Corruption], p: float, random_strength: tuple[str, ...] = ()):
        super().__init__()
        if not 0 < p <= 1:
            raise ValueError(f"the probability of applying each corruption must be in (0, 1], got {p}")
        for c in corruptions:
            c.per_batch = True
        self.corruptions = nn.ModuleList(corruptions)
        self.p = p
        self.random_strength = tuple(random_strength)

    def forward(self, x: torch.Tensor, strength=None) -> torch.Tensor:
        # `strength` is accepted for the chain interface and ignored: the original never ramps the corruptions.
        for c in self.corruptions:
            if float(torch.rand(())) < self.p:  # one coin per call, from the CPU generator: no device sync
                s = float(torch.rand(())) if c.name in self.random_strength else 1.0
                x = c(x, s)
        return x

    def extra_repr(self):
        return f"p={self.p}, order={[c.name for c in self.corruptions]}, random_strength={list(self.random_strength)}"


def original_chain(kind: str, p: float = 0.75, seed: int = 0) -> FixedOrderChain:
    """The original's chain of train_rs_aug.py (kind 'rs_aug') or of train.py --aug (kind 'plain_da'); `seed`
    decides plain_da's one JPEG quality, so that a resumed run keeps it."""
    if kind not in KINDS:
        raise ValueError(f"unknown original chain {kind!r}; choose one of {KINDS}")
    rs_aug = kind == "rs_aug"
    amount = 0.3 if rs_aug else 0.4
    blur = GaussianBlur(sigma=(1.0, 3.0), kernel_hw=(7, 3))
    if rs_aug:
        jpeg = JPEG(quality=(50.0, 100.0))
    else:
        # once, for the whole run, as the original builds its DiffJPEG
        quality = float(50 + 50 * torch.rand((), generator=torch.Generator().manual_seed(seed)))
        jpeg = JPEG(quality=(quality, quality))
    corruptions = [ColorJitter(brightness=amount, contrast=amount, saturation=amount, hue=0.0),
                   ResizedCrop(scale=(0.7, 1.0) if rs_aug else (0.4, 1.0)),
                   blur,
                   Rotation(degrees=(0.0, 30.0)),
                   Perspective(distortion=(0.1, 0.1) if rs_aug else (0.4, 0.4)),
                   jpeg]
    return FixedOrderChain(corruptions, p, random_strength=("jitter",) if rs_aug else ())
