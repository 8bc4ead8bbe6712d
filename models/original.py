"""The original DeepRAFT code's two networks (xinghua-qu/DeepRAFT, model.py), module for module.

Submodule names and tensor shapes are the original's (`conv1.conv.weight`, `fc1.linear.weight`, ...), so an
original state dict maps onto these by name alone (models.convert_original). Both are fixed to 400×400 inputs:
their dense layers read a 25×25 feature map (400 / 2⁴) and the encoder's dense branch writes a 3×50×50 map that
is upsampled ×8 to 400×400. `StampEncoder(arch='stegastamp')` and `Scanner(arch='deepraft')` wrap them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: The only input side the original networks accept.
ORIGINAL_SIZE = 400


class ConvReLU(nn.Module):
    """The original's `Conv2D`: a 'same'-padded conv, then ReLU unless `relu` is False; He-normal weights."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, relu: bool = True,
                 padding_mode: str = "zeros"):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, padding_mode=padding_mode)
        nn.init.kaiming_normal_(self.conv.weight)
        self.relu = relu

    def forward(self, x):
        x = self.conv(x)
        return F.relu(x) if self.relu else x


class Dense(nn.Module):
    """The original's `Dense`: a linear layer, then ReLU unless `relu` is False; He-normal weights."""

    def __init__(self, fin: int, fout: int, relu: bool = True):
        super().__init__()
        self.linear = nn.Linear(fin, fout)
        nn.init.kaiming_normal_(self.linear.weight)
        self.relu = relu

    def forward(self, x):
        x = self.linear(x)
        return F.relu(x) if self.relu else x


def check_original_size(x: torch.Tensor, who: str) -> None:
    """One clear line instead of a shape error deep inside a dense layer."""
    if tuple(x.shape[-2:]) != (ORIGINAL_SIZE, ORIGINAL_SIZE):
        raise ValueError(f"{who} takes {ORIGINAL_SIZE}x{ORIGINAL_SIZE} images only (its dense layers are sized for "
                         f"them), got {x.shape[-2]}x{x.shape[-1]}: fit the photos to {ORIGINAL_SIZE}x{ORIGINAL_SIZE} "
                         f"(--image_size {ORIGINAL_SIZE}), or use --encoder unet / a fully convolutional --scanner")


def _strided_stack(padding_mode: str) -> nn.Sequential:
    """3→8→16→32→64 (stride 2 each, 400 → 25), then 64→1: the detector's and the image embedder's trunk."""
    return nn.Sequential(ConvReLU(3, 8, stride=2, padding_mode=padding_mode),
                         ConvReLU(8, 16, stride=2, padding_mode=padding_mode),
                         ConvReLU(16, 32, stride=2, padding_mode=padding_mode),
                         ConvReLU(32, 64, stride=2, padding_mode=padding_mode),
                         ConvReLU(64, 1, padding_mode=padding_mode))


class DeepRAFTDetector(nn.Module):
    """The original `StampDetector`: x (B,3,400,400) in [0,1] → logits (B,2).

    The original returns log_softmax with clean = class 1; this returns the logits of fc2 with the label order
    swapped by the caller's weights (models.convert_original swaps fc2's rows), so that class 0 = clean as in the
    rest of the project. log_softmax is a per-row shift of the logits: argmax and cross-entropy are unchanged.
    """

    def __init__(self, padding_mode: str = "zeros"):
        super().__init__()
        self.model = _strided_stack(padding_mode)
        self.fc1 = Dense(25 * 25, 100)
        self.fc2 = Dense(100, 2, relu=False)

    def forward(self, x):
        check_original_size(x, "the deepraft scanner")
        return self.fc2(self.fc1(torch.flatten(self.model(x - 0.5), 1)))


class ImageEmbedder(nn.Module):
    """The original encoder's image branch: the detector's trunk, then dense 625→100 (ReLU)."""

    def __init__(self, padding_mode: str = "zeros"):
        super().__init__()
        self.model = _strided_stack(padding_mode)
        self.fc1 = Dense(25 * 25, 100)

    def forward(self, x):
        return self.fc1(torch.flatten(self.model(x), 1))


class StegaStampUNet(nn.Module):
    """The original `StegaStampEncoder`: x (B,3,400,400) in [0,1] → unbounded residual (B,3,400,400).

    The image embedder's 100 features go through dense 100→7500 (ReLU), are reshaped to 3×50×50 and upsampled ×8
    (nearest); that map and x − 0.5 form the 6-channel input of a U-Net 32-32-64-128-256 whose last merge also
    takes the 6-channel input (70 channels). The residual is a 1×1 conv, with no activation.
    """

    def __init__(self, padding_mode: str = "zeros"):
        super().__init__()
        pm = padding_mode
        self.hidden_dense = Dense(100, 7500)
        self.embedder = ImageEmbedder(pm)
        self.conv1 = ConvReLU(6, 32, padding_mode=pm)
        self.conv2 = ConvReLU(32, 32, stride=2, padding_mode=pm)
        self.conv3 = ConvReLU(32, 64, stride=2, padding_mode=pm)
        self.conv4 = ConvReLU(64, 128, stride=2, padding_mode=pm)
        self.conv5 = ConvReLU(128, 256, stride=2, padding_mode=pm)
        self.up6 = ConvReLU(256, 128, padding_mode=pm)
        self.conv6 = ConvReLU(256, 128, padding_mode=pm)
        self.up7 = ConvReLU(128, 64, padding_mode=pm)
        self.conv7 = ConvReLU(128, 64, padding_mode=pm)
        self.up8 = ConvReLU(64, 32, padding_mode=pm)
        self.conv8 = ConvReLU(64, 32, padding_mode=pm)
        self.up9 = ConvReLU(32, 32, padding_mode=pm)
        self.conv9 = ConvReLU(70, 32, padding_mode=pm)
        self.residual = ConvReLU(32, 3, kernel=1, relu=False)

    def forward(self, x):
        check_original_size(x, "the stegastamp encoder")
        image = x - 0.5
        hidden = self.hidden_dense(self.embedder(image)).reshape(-1, 3, 50, 50)
        inputs = torch.cat([F.interpolate(hidden, scale_factor=8, mode="nearest"), image], 1)
        c1 = self.conv1(inputs)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        c5 = self.conv5(c4)

        def up(h):
            return F.interpolate(h, scale_factor=2, mode="nearest")

        c6 = self.conv6(torch.cat([c4, self.up6(up(c5))], 1))
        c7 = self.conv7(torch.cat([c3, self.up7(up(c6))], 1))
        c8 = self.conv8(torch.cat([c2, self.up8(up(c7))], 1))
        c9 = self.conv9(torch.cat([c1, self.up9(up(c8)), inputs], 1))
        return self.residual(c9)
