"""Reference models for demos, tests and benchmarks.

Both take ``(N, 1, H, W)`` images (8x8 digits, 28x28 Fashion-MNIST) and use global average pooling,
so any input size works. :class:`SmallResNet` names its residual stages ``layer1``, ``layer2``,
``layer3`` so that block-level regularizers (block replacement) can address them. The residual
add goes through ``FloatFunctional`` so eager-mode torch.ao ``convert`` can quantize it.

The zoo (:data:`ZOO`: :class:`ResNet18`, :class:`MobileNetV2`, :class:`MobileNetV3`) is written like
torchvision's models -- plain ``+`` residuals, a shared in-place ``relu``, ReLU6, depthwise convs,
squeeze-excitation with a multiply, hardswish / SiLU -- to test the package on models users bring.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.ao.nn.quantized import FloatFunctional

__all__ = ["SmallCNN", "SmallResNet", "ResNet20", "BasicBlock", "build_model", "MODELS", "ZOO",
           "ResNet18", "MobileNetV2", "MobileNetV3", "TVBasicBlock", "InvertedResidual", "MBConv",
           "SqueezeExcitation", "ConvBNAct"]


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


# --- architecture zoo: torchvision / timm-style models written here (torchvision does not load) ---

def _make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision's channel rounding: nearest multiple of ``divisor``, never below 90 % of ``v``."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class TVBasicBlock(nn.Module):
    """torchvision's ResNet ``BasicBlock``: one ``relu`` module used twice, a plain ``+`` residual."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return self.relu(out)


class ResNet18(nn.Module):
    """torchvision-style ResNet-18: 7x7/2 stem, 3x3/2 max pool, ``layer1..4`` of two basic blocks
    (``width``, 2x, 4x, 8x channels; ``width=64`` is torchvision's), adaptive average pool, ``fc``.
    Works at 224x224 and at small inputs (32x32 ends at 1x1 before the pool)."""

    def __init__(self, num_classes: int = 1000, width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        w = width
        self.inplanes = w
        self.conv1 = nn.Conv2d(in_channels, w, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(w, 2)
        self.layer2 = self._make_layer(2 * w, 2, stride=2)
        self.layer3 = self._make_layer(4 * w, 2, stride=2)
        self.layer4 = self._make_layer(8 * w, 2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * w, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes))
        layers = [TVBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [TVBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ConvBNAct(nn.Sequential):
    """conv-bn-activation (torchvision's ``Conv2dNormActivation``); ``groups=channels`` is depthwise."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 act: type[nn.Module] | None = nn.ReLU6) -> None:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                                   nn.BatchNorm2d(cout)]
        if act is not None:
            layers.append(act(inplace=True) if act in (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU) else act())
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (ReLU6), 3x3 depthwise (ReLU6), 1x1 linear projection, ``x + ...``."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(cin, hidden, 1))
        layers += [ConvBNAct(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


MOBILENET_V2_SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1],
                        [6, 160, 3, 2], [6, 320, 1, 1]]


class MobileNetV2(nn.Module):
    """torchvision-style MobileNetV2 (``features`` / ``classifier``), width multiplier ``width``
    (1.0 is the paper's), ``inverted_residual_setting`` rows ``[t, c, n, s]`` (default: the paper's)."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0, in_channels: int = 3,
                 inverted_residual_setting: list[list[int]] | None = None, last_channel: int = 1280,
                 dropout: float = 0.2) -> None:
        super().__init__()
        setting = inverted_residual_setting or MOBILENET_V2_SETTING
        cin = _make_divisible(32 * width)
        self.last_channel = _make_divisible(last_channel * max(1.0, width))
        features: list[nn.Module] = [ConvBNAct(in_channels, cin, 3, 2)]
        for t, c, n, s in setting:
            cout = _make_divisible(c * width)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(ConvBNAct(cin, self.last_channel, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


class SqueezeExcitation(nn.Module):
    """torchvision's SE: average pool, 1x1 conv, ReLU, 1x1 conv, hardsigmoid gate, ``scale * x``."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.activation = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


_ACTS: dict[str, type[nn.Module]] = {"RE": nn.ReLU, "HS": nn.Hardswish, "SI": nn.SiLU}


class MBConv(nn.Module):
    """MobileNetV3 / EfficientNet block: 1x1 expand, kxk depthwise, [SE], 1x1 projection, ``x + ...``.
    ``act``: ``"RE"`` (ReLU), ``"HS"`` (hardswish, MobileNetV3) or ``"SI"`` (SiLU, EfficientNet)."""

    def __init__(self, cin: int, kernel: int, expanded: int, cout: int, use_se: bool, act: str, stride: int) -> None:
        super().__init__()
        a = _ACTS[act]
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(ConvBNAct(cin, expanded, 1, act=a))
        layers.append(ConvBNAct(expanded, expanded, kernel, stride, groups=expanded, act=a))
        if use_se:
            layers.append(SqueezeExcitation(expanded, _make_divisible(expanded // 4)))
        layers.append(ConvBNAct(expanded, cout, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


# MobileNetV3-Small rows (kernel, expanded, out, SE, activation, stride), torchvision's table
MOBILENET_V3_SMALL_SETTING = [(3, 16, 16, True, "RE", 2), (3, 72, 24, False, "RE", 2), (3, 88, 24, False, "RE", 1),
                              (5, 96, 40, True, "HS", 2), (5, 240, 40, True, "HS", 1), (5, 240, 40, True, "HS", 1),
                              (5, 120, 48, True, "HS", 1), (5, 144, 48, True, "HS", 1), (5, 288, 96, True, "HS", 2),
                              (5, 576, 96, True, "HS", 1), (5, 576, 96, True, "HS", 1)]


class MobileNetV3(nn.Module):
    """MobileNetV3-style network (``features`` / ``avgpool`` / ``classifier``): hardswish stem, MBConv
    blocks with squeeze-excitation (hardsigmoid gate, a multiply), classifier Linear-Hardswish-Dropout-Linear.
    ``setting`` rows ``(kernel, expanded, out, use_se, act, stride)`` (default: MobileNetV3-Small; an
    ``"SI"`` activation gives EfficientNet's SiLU), channels scaled by ``width``."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0, in_channels: int = 3,
                 setting: list[tuple[int, int, int, bool, str, int]] | None = None, last_channel: int = 1024,
                 dropout: float = 0.2) -> None:
        super().__init__()
        rows = setting or MOBILENET_V3_SMALL_SETTING
        cin = _make_divisible(16 * width)
        features: list[nn.Module] = [ConvBNAct(in_channels, cin, 3, 2, act=nn.Hardswish)]
        for k, e, c, se, act, s in rows:
            cout = _make_divisible(c * width)
            features.append(MBConv(cin, k, _make_divisible(e * width), cout, se, act, s))
            cin = cout
        last_conv = 6 * cin
        features.append(ConvBNAct(cin, last_conv, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        last = _make_divisible(last_channel * width)
        self.classifier = nn.Sequential(nn.Linear(last_conv, last), nn.Hardswish(inplace=True),
                                        nn.Dropout(dropout), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


MODELS: dict[str, type[nn.Module]] = {"cnn": SmallCNN, "resnet": SmallResNet, "resnet20": ResNet20}
# third-party-style architectures (RGB, ImageNet-sized by default; ``width`` is a multiplier for the MobileNets)
ZOO: dict[str, type[nn.Module]] = {"resnet18": ResNet18, "mobilenet_v2": MobileNetV2, "mobilenet_v3": MobileNetV3}


def build_model(name: str, *, num_classes: int = 10, width: int = 16, in_channels: int = 1) -> nn.Module:
    """Build a reference model by name (``"cnn"``, ``"resnet"`` or ``"resnet20"``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](num_classes=num_classes, width=width, in_channels=in_channels)
