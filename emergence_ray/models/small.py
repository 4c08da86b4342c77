"""Our small models for tiny images (digits, Fashion-MNIST, CIFAR-sized): `mlp`, `cnn` and
`resnet18_small` (torchvision's ResNet-18 with a 3x3 stride-1 stem and no max-pool).

Each builder takes `(in_channels, num_classes, image_size, width, depth, dropout)`.
"""

from __future__ import annotations

from torch import nn


def mlp(in_channels: int, num_classes: int, image_size: int, width: int = 256, depth: int = 2,
        dropout: float = 0.0) -> nn.Module:
    """A stack of sigma(Wx + b) layers (sigmoid units), then a linear classifier."""
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = in_channels * image_size * image_size
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.Sigmoid(), nn.Dropout(dropout)]
        fan_in = width
    layers.append(nn.Linear(fan_in, num_classes))
    return nn.Sequential(*layers)


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def cnn(in_channels: int, num_classes: int, image_size: int, width: int = 32, depth: int = 2,
        dropout: float = 0.0) -> nn.Module:
    """Small conv net: two stages of two conv-BN-ReLU (width, then 2x width channels), each
    followed by a 2x2 max-pool while the map is at least 8 px; the map (pooled to at most 7x7)
    is flattened into a linear head. Keeping where features are, rather than a global average,
    is worth ~2 points on Fashion-MNIST at the same cost."""
    layers: list[nn.Module] = []
    c_in, size = in_channels, image_size
    for stage in range(2):
        c_out = width * 2**stage
        layers += [*_conv_bn(c_in, c_out), *_conv_bn(c_out, c_out)]
        if size >= 8:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        c_in = c_out
    side = min(size, 7)
    layers += [nn.AdaptiveAvgPool2d(side), nn.Flatten(), nn.Dropout(dropout),
               nn.Linear(c_in * side * side, num_classes)]
    return nn.Sequential(*layers)


def resnet18_small(in_channels: int, num_classes: int, image_size: int, width: int = 64, depth: int = 2,
                   dropout: float = 0.0) -> nn.Module:
    """torchvision's ResNet-18 adapted to small images: 3x3 stride-1 stem, no max-pool.
    (`resnet18` is torchvision's own, with the ImageNet stem, and takes ImageNet weights.)"""
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    if dropout:
        model.fc = nn.Sequential(nn.Dropout(dropout), model.fc)
    return model


SMALL = {"mlp": mlp, "cnn": cnn, "resnet18_small": resnet18_small}
