"""Backbones with a `features(x)` / `classifier` split, so stage 2 can freeze one and reuse the other.

- `resnet32` (and `resnet8`, `resnet20`, `resnet56`): the CIFAR ResNet of LDAM-DRW, option-A shortcuts,
  64-d features.
- `resnet10`, `resnet18`, `resnet50`: torchvision ResNets for larger images.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import LadcError


class ShortcutA(nn.Module):
    """Parameter-free shortcut: stride-2 subsample, then zero-pad channels."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = ShortcutA(planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images: stem 3->16, three stages 16/32/64, global pool, linear head."""

    def __init__(self, depth: int = 32, num_classes: int = 10):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.feature_dim = 64
        self.classifier = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def features(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x):
        return self.classifier(self.features(x))


class TorchvisionResNet(nn.Module):
    """torchvision ResNet body (no pretrained weights) with `features` / `classifier` exposed."""

    def __init__(self, name: str, num_classes: int):
        super().__init__()
        import torchvision.models as tvm
        from torchvision.models.resnet import BasicBlock as TvBasic, ResNet

        net = ResNet(TvBasic, [1, 1, 1, 1]) if name == "resnet10" else getattr(tvm, name)(weights=None)
        self.feature_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.body = net
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.classifier(self.features(x))


CIFAR_DEPTHS = {"resnet8": 8, "resnet20": 20, "resnet32": 32, "resnet56": 56}
TORCHVISION = ("resnet10", "resnet18", "resnet50")
BACKBONES = tuple(CIFAR_DEPTHS) + TORCHVISION


def create_model(name: str, num_classes: int) -> nn.Module:
    """Backbone factory by name."""
    if name in CIFAR_DEPTHS:
        return CifarResNet(CIFAR_DEPTHS[name], num_classes)
    if name in TORCHVISION:
        return TorchvisionResNet(name, num_classes)
    raise LadcError(f"unknown backbone '{name}': choose one of {', '.join(BACKBONES)}")


class ImageClassifier(nn.Module):
    """The shippable model: raw uint8 images [B, 3, H, W] in, logits out
    (normalise -> frozen backbone features -> stage-2 classifier)."""

    def __init__(self, backbone: nn.Module, classifier: nn.Module, mean, std):
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0)

    def forward(self, images):
        x = (images.float() - self.mean) / self.std
        return self.classifier(self.backbone.features(x))
