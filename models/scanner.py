"""Scanner S: a ResNet that tells stamped images (class 1) from clean ones (class 0)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1

from .original import ORIGINAL_SIZE, DeepRAFTDetector

CLEAN, STAMPED = 0, 1

# ImageNet statistics: the usual input normalisation for a torchvision ResNet.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)

RESNETS = {
    "resnet18": ((64, 128, 256, 512), (2, 2, 2, 2)),  # torchvision's ResNet-18, layer for layer
    "narrow": ((16, 32, 64, 128), (2, 2, 2, 2)),  # a quarter of the width: ~16x fewer FLOPs, for CPU
}
#: The CPU scanner: (out channels, kernel, stride) per conv, each followed by BatchNorm and ReLU. A 4×4 stride-4
#: "patchify" stem, then 3×3 convs that halve the resolution every other layer. No padding anywhere ("valid"
#: convolutions): a convolution that never sees a padded border cannot tell where the border is, so, like
#: replicate padding in the ResNets, it gives the encoder no reason to hide the stamp in a stripe along it,
#: and it costs nothing (replicate padding made the same network ~3x slower on CPU). Measured at 400×400,
#: batch 8, channels_last, 2 CPU cores: 299–447 images/s, about 4x 'narrow' in the same runs (docs/models.md).
FAST_LAYERS = ((16, 4, 4), (32, 3, 2), (32, 3, 1), (64, 3, 2), (64, 3, 1), (128, 3, 2), (128, 1, 1))
#: 'deepraft' is the original code's small detector (models.original), 400×400 only.
ARCHS = (*RESNETS, "fast", "deepraft")


def valid_min_size(layers=None) -> int:
    """Smallest side a stack of unpadded convs (default: FAST_LAYERS) maps to at least one output pixel."""
    size = 1
    for _, kernel, stride in reversed(layers or FAST_LAYERS):
        size = (size - 1) * stride + kernel
    return size


@dataclass
class ScannerConfig:
    """Architecture of the scanner; saved beside its weights.

    arch: 'resnet18' (the ResNet the paper describes), 'narrow' (same depth, 16-32-64-128 channels), 'fast' (a
        7-layer unpadded conv net, FAST_LAYERS, the shipped CPU scanner) or 'deepraft' (the detector the original
        code trains: 5 convs and 2 dense layers, no BatchNorm, 400×400 inputs only).
    padding_mode: of the ResNets and 'deepraft', 'replicate' (default) or 'zeros' (torchvision's and the
        original's). Zero padding lets the scanner find the image border, which rewards an encoder that hides the
        stamp there; see StampEncoderConfig. 'fast' has no padding, so this does not apply to it.
    """

    arch: str = "resnet18"
    padding_mode: str = "replicate"

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown scanner arch {self.arch!r}; choose one of {sorted(ARCHS)}")


class Scanner(nn.Module):
    """ResNet built from torchvision's BasicBlock (arch 'resnet18' or 'narrow'), or the fast unpadded conv net.
    With arch='resnet18' its parameters are exactly torchvision.models.resnet18(num_classes=2)'s, under the
    same names. With arch='deepraft', the original detector (models.original.DeepRAFTDetector) under `net`, on
    400×400 inputs only (`input_size`).

    x (B,3,H,W) in [0,1], any H, W ≥ 1 (global average pooling) → logits (B,2): 0 = clean, 1 = stamped.
    Returns logits, never probabilities, so that attack libraries can use it directly. The fast net needs
    sides of at least valid_min_size() pixels (108); smaller images are replicate-padded up to that.
    """

    def __init__(self, config: ScannerConfig | None = None):
        super().__init__()
        self.config = config = config or ScannerConfig()
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)
        #: the one input side the architecture accepts, or None for any
        self.input_size = ORIGINAL_SIZE if config.arch == "deepraft" else None
        if config.arch == "deepraft":
            # its own He-normal (fan-in) initialisation and input shift (x − 0.5), as in the original
            self.net = DeepRAFTDetector(config.padding_mode)
            return
        if config.arch == "fast":
            self._build_fast()
        else:
            self._build_resnet(*RESNETS[config.arch])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.padding != (0, 0):
                    m.padding_mode = config.padding_mode

    def _build_fast(self):
        layers, cin = [], 3
        for cout, kernel, stride in FAST_LAYERS:
            layers += [nn.Conv2d(cin, cout, kernel, stride, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.min_size = valid_min_size()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, 2)

    def _build_resnet(self, widths, blocks):
        self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = widths[0]
        for i, (planes, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or inplanes != planes:
                downsample = nn.Sequential(conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))
            layers = [BasicBlock(inplanes, planes, stride, downsample)]
            layers += [BasicBlock(planes, planes) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.arch == "deepraft":
            return self.net(x)
        x = (x - self.mean) / self.std
        if self.config.arch == "fast":
            h, w = x.shape[-2:]
            if min(h, w) < self.min_size:
                x = F.pad(x, (0, max(0, self.min_size - w), 0, max(0, self.min_size - h)), mode="replicate")
            return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))
