"""Scanner S: a ResNet that tells stamped images (class 1) from clean ones (class 0)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1

CLEAN, STAMPED = 0, 1

# ImageNet statistics: the usual input normalisation for a torchvision ResNet.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)

ARCHS = {
    "resnet18": ((64, 128, 256, 512), (2, 2, 2, 2)),  # torchvision's ResNet-18, layer for layer
    "narrow": ((16, 32, 64, 128), (2, 2, 2, 2)),  # a quarter of the width: ~16x fewer FLOPs, for CPU
}


@dataclass
class ScannerConfig:
    """Architecture of the scanner; saved beside its weights.

    arch: 'resnet18' (the paper's) or 'narrow' (same depth, 16-32-64-128 channels, for CPU).
    padding_mode: 'replicate' (default) or 'zeros' (torchvision's). Zero padding lets the scanner find the
        image border, which rewards an encoder that hides the stamp there; see StampEncoderConfig.
    """

    arch: str = "resnet18"
    padding_mode: str = "replicate"

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown scanner arch {self.arch!r}; choose one of {sorted(ARCHS)}")


class Scanner(nn.Module):
    """ResNet built from torchvision's BasicBlock; with arch='resnet18' its parameters are exactly
    torchvision.models.resnet18(num_classes=2)'s, under the same names.

    x (B,3,H,W) in [0,1], any H, W ≥ 1 (global average pooling) → logits (B,2): 0 = clean, 1 = stamped.
    Returns logits, never probabilities, so that attack libraries can use it directly.
    """

    def __init__(self, config: ScannerConfig | None = None):
        super().__init__()
        self.config = config = config or ScannerConfig()
        widths, blocks = ARCHS[config.arch]
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)
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
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.padding != (0, 0):
                    m.padding_mode = config.padding_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))
