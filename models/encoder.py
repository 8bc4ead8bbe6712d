"""Stamp encoder E: a StegaStamp-shaped U-Net that maps an image to an invisible residual.

The stamp carries no message (zero-bit watermark), so unlike StegaStamp there is no secret input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .jnd import attenuation
from .original import ORIGINAL_SIZE, StegaStampUNet

#: Encoder architectures: 'unet' (ours, fully convolutional, any size) and 'stegastamp' (the original code's, with
#: its image embedder and dense branch, 400×400 only).
ENCODER_ARCHS = ("unet", "stegastamp")

#: Channels of StegaStamp's encoder, down path (conv1..conv5); the up path mirrors it.
STEGASTAMP_CHANNELS = (32, 32, 64, 128, 256)


@dataclass
class StampEncoderConfig:
    """Architecture of the stamp encoder; saved beside its weights.

    arch: 'unet' (a fully convolutional StegaStamp-shaped U-Net, any input size) or 'stegastamp' (the original
        DeepRAFT encoder, models.original.StegaStampUNet, 400×400 inputs only; `width` does not apply).
    width: multiplier on STEGASTAMP_CHANNELS (1.0 = StegaStamp's 32-32-64-128-256).
    max_residual: bound on |δ| per pixel and channel, in [0,1] pixel units (δ = max_residual·tanh(u/max_residual)
        of the unbounded residual u, which the L1 term of L_rr regularises); 0 leaves
        the residual unbounded, as the original does. Unbounded residuals blow up while the scanner is still
        learning on small crops; the image losses then pull δ far below this bound.
    padding_mode: 'replicate' (default) or 'zeros'. Zero padding tells every layer where the image border
        is, and the encoder learns to hide the stamp in a visible stripe along it, which any crop removes.
        Replicate padding keeps the network blind to position: a flat image gets a flat residual.
    jnd: strength of the perceptual shaping (models.jnd): the residual is multiplied, per pixel, by ĵ(x)^jnd, the
        just-noticeable-difference map of the photo being stamped normalised to [0.25, 1] (1 in texture, near
        edges and in deep shadow; 0.25 on a flat mid-grey), after the bound, so that the bound becomes local:
        |δ| ≤ max_residual·ĵ^jnd. 0 (the default, and what a config.json written before the field existed
        means) is no shaping, the network's residual exactly as before; 1 the map itself; 2 its square.
    """

    width: float = 1.0
    max_residual: float = 0.05
    padding_mode: str = "replicate"
    arch: str = "unet"
    jnd: float = 0.0

    def __post_init__(self):
        if self.arch not in ENCODER_ARCHS:
            raise ValueError(f"unknown encoder arch {self.arch!r}; choose one of {list(ENCODER_ARCHS)}")
        if not self.max_residual >= 0:
            raise ValueError(f"max_residual must be >= 0 (0 = unbounded), got {self.max_residual}")
        if not (self.jnd >= 0 and math.isfinite(self.jnd)):
            raise ValueError(f"jnd must be a finite number >= 0 (0 = no perceptual shaping), got {self.jnd}")

    def channels(self) -> tuple[int, ...]:
        return tuple(max(1, round(c * self.width)) for c in STEGASTAMP_CHANNELS)


def _conv(cin: int, cout: int, padding_mode: str, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, padding_mode=padding_mode),
        nn.ReLU(inplace=True),
    )


class StampEncoder(nn.Module):
    """U-Net: image x (B,3,H,W) in [0,1] → residual δ (B,3,H,W), |δ| ≤ max_residual (when max_residual > 0),
    shaped by the photo's JND map when config.jnd > 0 (|δ| ≤ max_residual·ĵ(x)^jnd).

    arch 'unet': any H and W ≥ 1. Down: 3→c1 (stride 1), c1→c2→c3→c4→c5 (stride 2 each). Up: nearest
    upsampling to the skip's exact size (so odd sizes work), conv, concatenation with the skip, conv. The last
    stage also sees the input.
    arch 'stegastamp': the original encoder (models.original.StegaStampUNet) under `net`, 400×400 only.
    """

    def __init__(self, config: StampEncoderConfig | None = None):
        super().__init__()
        self.config = config = config or StampEncoderConfig()
        #: the one input side the architecture accepts, or None for any
        self.input_size = ORIGINAL_SIZE if config.arch == "stegastamp" else None
        if config.arch == "stegastamp":
            self.net = StegaStampUNet(config.padding_mode)
            return
        c1, c2, c3, c4, c5 = config.channels()
        pm = config.padding_mode
        self.down = nn.ModuleList(
            [_conv(3, c1, pm), _conv(c1, c2, pm, 2), _conv(c2, c3, pm, 2), _conv(c3, c4, pm, 2), _conv(c4, c5, pm, 2)]
        )
        # (channels coming up, skip channels, output channels) for each up stage
        stages = [(c5, c4, c4), (c4, c3, c3), (c3, c2, c2), (c2, c1 + 3, c1)]
        self.up_convs = nn.ModuleList([_conv(cin, cout, pm) for cin, _, cout in stages])
        self.merge_convs = nn.ModuleList([_conv(cout + skip, cout, pm) for _, skip, cout in stages])
        # Default (random) initialisation on purpose: a zero-initialised output starts from δ = 0, where the
        # scanner has nothing to learn from and the encoder no direction to grow in; training stalls.
        self.to_residual = nn.Conv2d(c1, 3, 1)

    def forward(self, x: torch.Tensor, bounded: bool = True) -> torch.Tensor:
        """x (B,3,H,W) in [0,1] → δ (B,3,H,W); with bounded=False the residual before its bound (see `bound`).

        With config.jnd > 0 both are shaped by the photo's JND map w = ĵ(x)^jnd (models.jnd, fp32, no gradient
        to x): bounded=False gives w·u, the shaped residual that the L1 term regularises (≈ δ wherever the bound
        is inactive, as without shaping), and δ = w·m·tanh(u/m) = bound(w·u, x)."""
        if self.config.arch == "stegastamp":
            r = self.net(x)
        else:
            h = x - 0.5
            feats = []
            for conv in self.down:
                h = conv(h)
                feats.append(h)
            # As in StegaStamp, the input itself joins the last skip connection.
            skips = [feats[3], feats[2], feats[1], torch.cat([feats[0], x - 0.5], 1)]
            for up_conv, merge_conv, skip in zip(self.up_convs, self.merge_convs, skips):
                h = up_conv(F.interpolate(h, size=skip.shape[-2:], mode="nearest"))
                h = merge_conv(torch.cat([skip, h], 1))
            r = self.to_residual(h)
        m = self.config.max_residual
        unbounded = m * r if m > 0 else r
        if self.config.jnd > 0:  # perceptual shaping; jnd 0 takes none of this path (bit-identical to before)
            w = self.shaping(x)
            unbounded = unbounded * w
            return self._bound(unbounded, w) if bounded else unbounded
        return self.bound(unbounded) if bounded else unbounded

    def shaping(self, x: torch.Tensor) -> torch.Tensor | None:
        """The per-pixel factor ĵ(x)^jnd (B,1,H,W) fp32 in (0, 1] that shapes the residual of x (no gradient),
        or None when config.jnd is 0."""
        return attenuation(x, self.config.jnd) if self.config.jnd > 0 else None

    def bound(self, unbounded: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """δ = max_residual·tanh(u / max_residual) of the unbounded residual u (pixel units): u itself where
        |u| ≪ max_residual, never beyond ±max_residual; u unchanged when max_residual is 0.

        With perceptual shaping (config.jnd > 0), u is forward(x, bounded=False) = w·u_net and the bound is local:
        δ = w·m·tanh(u/(w·m)) = w·m·tanh(u_net/m), |δ| ≤ m·w, w = ĵ(x)^jnd; the photo x is then required."""
        if self.config.jnd > 0:
            if x is None:
                raise ValueError(f"this encoder shapes its residual by the photo's JND map (jnd {self.config.jnd}):"
                                 f" bound(u, x) needs the photo x")
            return self._bound(unbounded, self.shaping(x))
        m = self.config.max_residual
        return m * torch.tanh(unbounded / m) if m > 0 else unbounded

    def _bound(self, shaped: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """w·m·tanh(shaped/(w·m)) for shaped = w·u (w > 0): the bound scaled by w per pixel; shaped itself when
        max_residual is 0."""
        m = self.config.max_residual
        if m <= 0:
            return shaped
        local = m * w
        return local * torch.tanh(shaped / local)

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        """x (B,3,H,W) in [0,1] → stamped x' = clamp(x + δ, 0, 1): what an image file can hold."""
        return (x + self(x)).clamp(0, 1)
