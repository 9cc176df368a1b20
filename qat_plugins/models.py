"""Reference models for demos, tests and benchmarks.

Both take ``(N, 1, H, W)`` images (8x8 digits, 28x28 Fashion-MNIST) and use global average pooling,
so any input size works. :class:`SmallResNet` names its residual stages ``layer1``, ``layer2``,
``layer3`` so that block-level regularizers (block replacement) can address them. The residual
add goes through ``FloatFunctional`` so eager-mode torch.ao ``convert`` can quantize it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.ao.nn.quantized import FloatFunctional

__all__ = ["SmallCNN", "SmallResNet", "ResNet20", "BasicBlock", "build_model", "MODELS"]


class SmallCNN(nn.Module):
    """conv-bn-relu x3 (the last two with stride 2), global average pool, linear classifier."""

    def __init__(self, num_classes: int = 10, width: int = 16, in_channels: int = 1) -> None:
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(in_channels, w, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * w)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * w)
        self.relu3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.fc(self.flatten(self.pool(x)))


class BasicBlock(nn.Module):
    """ResNet basic block: conv-bn-relu, conv-bn, (1x1 conv-bn shortcut), add, relu."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()
        self.add = FloatFunctional()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(self.add.add(out, self.shortcut(x)))


class SmallResNet(nn.Module):
    """stem conv-bn-relu, three residual stages ``layer1..3`` (one block each), pool, ``fc``."""

    def __init__(self, num_classes: int = 10, width: int = 16, in_channels: int = 1) -> None:
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(in_channels, w, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU()
        self.layer1 = BasicBlock(w, w)
        self.layer2 = BasicBlock(w, 2 * w, stride=2)
        self.layer3 = BasicBlock(2 * w, 4 * w, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20 (He et al. 2016): stem, three stages ``layer1..3`` of three basic blocks
    (``width``, ``2*width``, ``4*width`` channels; stride 2 at the start of stages 2 and 3, 1x1
    conv-bn shortcuts where the shape changes), global average pool, ``fc``. ``width=16`` is the paper's.
    """

    def __init__(self, num_classes: int = 10, width: int = 16, in_channels: int = 1, blocks: int = 3) -> None:
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(in_channels, w, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(w, w, blocks, 1)
        self.layer2 = self._stage(w, 2 * w, blocks, 2)
        self.layer3 = self._stage(2 * w, 4 * w, blocks, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * w, num_classes)

    @staticmethod
    def _stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(*[BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


MODELS: dict[str, type[nn.Module]] = {"cnn": SmallCNN, "resnet": SmallResNet, "resnet20": ResNet20}


def build_model(name: str, *, num_classes: int = 10, width: int = 16, in_channels: int = 1) -> nn.Module:
    """Build a reference model by name (``"cnn"``, ``"resnet"`` or ``"resnet20"``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](num_classes=num_classes, width=width, in_channels=in_channels)
