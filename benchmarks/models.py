"""Models for the deep-learning experiments: an MLP and a small ResNet with GroupNorm.

Both are plain ``nn.Module`` s meant to be run functionally (``torch.func.functional_call``
via :func:`soo_func.functional_loss` or :func:`make_model`). The ResNet uses GroupNorm,
not BatchNorm: BatchNorm's running statistics are updated in place during training,
which breaks ``torch.func`` transforms and Hessian products, and it couples the
examples of a batch (so a per-batch loss is not a sum of per-example losses).
Architecture after He et al. (2016), "Deep residual learning", at a small width.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MLP", "MODELS", "BasicBlock", "SmallResNet", "make_model"]

MODELS = ("mlp", "resnet", "resnet_s2")


class MLP(nn.Module):
    """``in_features -> hidden -> ... -> num_classes`` with tanh or ReLU activations."""

    def __init__(
        self,
        in_features: int = 784,
        hidden: tuple[int, ...] = (128,),
        num_classes: int = 10,
        activation: str = "relu",
    ):
        super().__init__()
        if activation not in ("relu", "tanh"):
            raise ValueError(f"MLP activation must be 'relu' or 'tanh', got {activation!r}")
        act = nn.ReLU if activation == "relu" else nn.Tanh
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), act()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _groups(channels: int, max_groups: int = 4) -> int:
    groups = min(max_groups, channels)
    while channels % groups:
        groups -= 1
    return groups


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm and a (projected when needed) identity shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.GroupNorm(_groups(out_channels), out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A stem convolution, one basic block per stage (widths ``w, 2w, 4w``; stride 2 after
    the first stage), global average pooling and a linear classifier. ``width=8`` has
    about 25k parameters. ``stem_stride=2`` halves the resolution in the stem (28x28 ->
    14x14), which cuts the convolution cost about 4x (the CPU-sized full-data run)."""

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, width: int = 8, stem_stride: int = 1
    ):
        super().__init__()
        if width < 1:
            raise ValueError(f"SmallResNet width must be >= 1, got {width}")
        if stem_stride not in (1, 2):
            raise ValueError(f"SmallResNet stem_stride must be 1 or 2, got {stem_stride}")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stem_stride, 1, bias=False),
            nn.GroupNorm(_groups(width), width),
            nn.ReLU(),
        )
        self.stages = nn.Sequential(
            BasicBlock(width, width, 1),
            BasicBlock(width, 2 * width, 2),
            BasicBlock(2 * width, 4 * width, 2),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(self.stem(x))
        return self.head(out.mean(dim=(2, 3)))


def make_model(
    name: str, *, num_classes: int = 10, width: int = 8, hidden: int = 128, seed: int = 0
) -> nn.Module:
    """A model of :data:`MODELS`, initialized from ``seed`` (float32, on the CPU).

    ``"mlp"``: one hidden layer of ``hidden``; ``"resnet"``: :class:`SmallResNet` of
    ``width``; ``"resnet_s2"``: the same with a stride-2 stem (about 4x cheaper).
    """
    torch.manual_seed(seed)
    if name == "mlp":
        return MLP(784, (hidden,), num_classes)
    if name == "resnet":
        return SmallResNet(1, num_classes, width)
    if name == "resnet_s2":
        return SmallResNet(1, num_classes, width, stem_stride=2)
    raise ValueError(f"unknown model {name!r}: use one of {MODELS}")
