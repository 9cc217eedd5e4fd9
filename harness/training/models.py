"""Model architectures, registered by name.

Each builder takes ``(num_classes, in_channels)`` and returns an ``nn.Module`` that maps
normalised NCHW float input to logits. Architectures keep the shapes the literature's
backdoor studies use (small CNN for digits, a VGG-style CIFAR CNN, ResNet-18 with a 3×3 stem),
end in global pooling so any input size works, and export to plain ONNX ops (Conv, Relu,
MaxPool, Add, GlobalAveragePool, Flatten, Gemm) that the quantizers and the replica cover.
"""

from __future__ import annotations

from torch import nn

from harness.training.catalog import MODELS

__all__ = ["MODELS"]


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class ConvNet(nn.Module):
    """Stacks of 3×3 conv-BN-ReLU with max-pooling, global average pool, a hidden FC layer.

    ``features`` ends at the last convolution's ReLU (the layer Fine-Pruning prunes);
    the hidden FC activation is the penultimate representation AC / SS cluster.
    """

    def __init__(
        self, stages: list[list[int]], num_classes: int, in_channels: int, hidden: int
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i, stage in enumerate(stages):
            for width in stage:
                layers += _conv_block(c, width)
                c = width
            if i < len(stages) - 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(c, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.head(self.pool(self.features(x)))


@MODELS.register("small_cnn")
def small_cnn(num_classes: int, in_channels: int) -> nn.Module:
    """~20k parameters: enough for 8×8 digits, trains in seconds on one core."""
    return ConvNet([[16], [32]], num_classes, in_channels, hidden=64)


@MODELS.register("cifar_cnn")
def cifar_cnn(num_classes: int, in_channels: int) -> nn.Module:
    """VGG-style 32-64-128-128 CNN for 32×32 inputs (one conv per stage, ~13M MACs).

    Deliberately slim: two models per seed must train on 2 CPU cores in minutes, and it still
    reaches ≥95% clean accuracy on GTSRB (see BENCHMARKS.md).
    """
    return ConvNet([[32], [64], [128], [128]], num_classes, in_channels, hidden=256)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3×3 convs, identity or 1×1 projection shortcut)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 with the CIFAR 3×3 stride-1 stem (no max-pool), as in most backdoor papers."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU()
        )
        blocks: list[nn.Module] = []
        c = 64
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(c, width, stride), BasicBlock(width, width, 1)]
            c = width
        self.features = nn.Sequential(self.stem, *blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.head(self.pool(self.features(x)))


@MODELS.register("resnet18")
def resnet18(num_classes: int, in_channels: int) -> nn.Module:
    """CIFAR-style ResNet-18 (11M parameters): the paper-scale model, slow on 2 CPU cores."""
    return ResNet18(num_classes, in_channels)


def build_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """Instantiate the registered architecture ``name``."""
    return MODELS.get(name)(num_classes, in_channels)
