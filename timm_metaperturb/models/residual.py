"""CIFAR-style residual networks of the paper: ResNet-20/32/44/56 (He et al. 2016) and WRN-28-2."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from .small_cnn import SmallCNN, paper_cfg


def conv3x3(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)


class ChannelPadShortcut(nn.Module):
    """He et al.'s parameter-free shortcut ("option A"): subsample by the stride, zero-pad the new channels."""

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        self.stride, self.pad = stride, out_chs - in_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn, plus the shortcut, then the closing ReLU (MetaPerturb's site is its input)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = conv3x3(in_chs, out_chs, stride), nn.BatchNorm2d(out_chs), nn.ReLU(True)
        self.conv2, self.bn2 = conv3x3(out_chs, out_chs), nn.BatchNorm2d(out_chs)
        shortcut = stride != 1 or in_chs != out_chs
        self.shortcut = ChannelPadShortcut(in_chs, out_chs, stride) if shortcut else nn.Identity()
        self.act2 = nn.ReLU(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Wide ResNet's pre-activation block: bn-relu-conv-bn-relu-conv, 1x1 projection where the shape changes."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1, self.act1, self.conv1 = nn.BatchNorm2d(in_chs), nn.ReLU(True), conv3x3(in_chs, out_chs, stride)
        self.bn2, self.act2, self.drop = nn.BatchNorm2d(out_chs), nn.ReLU(True), nn.Dropout(drop_rate)
        self.conv2 = conv3x3(out_chs, out_chs)
        project = stride != 1 or in_chs != out_chs
        self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride, bias=False) if project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        out = self.conv2(self.drop(self.act2(self.bn2(self.conv1(pre)))))
        return out + (self.shortcut(pre) if self.shortcut is not None else x)


def _stages(block, depth_per_stage: int, widths: tuple[int, ...], in_chs: int, **block_kwargs) -> nn.Sequential:
    blocks = []
    for i, width in enumerate(widths):
        for j in range(depth_per_stage):
            blocks.append(block(in_chs, width, 2 if i > 0 and j == 0 else 1, **block_kwargs))
            in_chs = width
    return nn.Sequential(*blocks)


class CifarResNet(SmallCNN):
    """ResNet-(6n+2) for 32x32 images: a 16-channel stem, 3 stages of n BasicBlocks at 16/32/64 channels."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3, **kwargs) -> None:
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n+2 (20, 32, 44, 56, ...), got {depth}")
        stem = nn.Sequential(conv3x3(in_chans, 16), nn.BatchNorm2d(16), nn.ReLU(True))
        blocks = _stages(BasicBlock, (depth - 2) // 6, (16, 32, 64), 16)
        super().__init__(stem, blocks, 64, num_classes, **kwargs)


class WideResNet(SmallCNN):
    """WRN-depth-width (Zagoruyko & Komodakis 2016): pre-activation blocks at 16k/32k/64k channels."""

    def __init__(
        self,
        depth: int = 28,
        width: int = 2,
        num_classes: int = 10,
        in_chans: int = 3,
        block_drop: float = 0.0,
        **kwargs,
    ) -> None:
        if (depth - 4) % 6:
            raise ValueError(f"a Wide ResNet has depth 6n+4 (16, 22, 28, 40, ...), got {depth}")
        widths = (16 * width, 32 * width, 64 * width)
        blocks = _stages(PreActBlock, (depth - 4) // 6, widths, 16, drop_rate=block_drop)
        final = nn.Sequential(nn.BatchNorm2d(widths[-1]), nn.ReLU(True))
        super().__init__(conv3x3(in_chans, 16), blocks, widths[-1], num_classes, final=final, **kwargs)


default_cfgs = generate_default_cfgs(
    {
        "resnet20": paper_cfg("stem.0"),
        "resnet32": paper_cfg("stem.0"),
        "resnet44": paper_cfg("stem.0"),
        "resnet56": paper_cfg("stem.0"),
        "wrn28_2": paper_cfg("stem"),
    }
)


def _create(cls, variant: str, pretrained: bool, **kwargs) -> nn.Module:
    return build_model_with_cfg(cls, variant, pretrained, **kwargs)


@register_model
def resnet20(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-20 for CIFAR-style 32x32 images (0.27 M parameters with 10 classes): the paper's source network."""
    return _create(CifarResNet, "resnet20", pretrained, depth=20, **kwargs)


@register_model
def resnet32(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-32 for CIFAR-style 32x32 images."""
    return _create(CifarResNet, "resnet32", pretrained, depth=32, **kwargs)


@register_model
def resnet44(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-44 for CIFAR-style 32x32 images."""
    return _create(CifarResNet, "resnet44", pretrained, depth=44, **kwargs)


@register_model
def resnet56(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-56 for CIFAR-style 32x32 images."""
    return _create(CifarResNet, "resnet56", pretrained, depth=56, **kwargs)


@register_model
def wrn28_2(pretrained: bool = False, **kwargs) -> WideResNet:
    """Wide ResNet 28-2 for CIFAR-style 32x32 images."""
    return _create(WideResNet, "wrn28_2", pretrained, depth=28, width=2, **kwargs)
