"""Plain convolutional networks of the paper: Conv4, Conv6 and VGG9, stacks of conv-bn-relu(-maxpool) blocks."""

from __future__ import annotations

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from .small_cnn import SmallCNN, paper_cfg


class ConvBlock(nn.Module):
    """conv3x3-bn-relu, then 2x2 max pooling when `pool` (MetaPerturb's site is the ReLU's input)."""

    def __init__(self, in_chs: int, out_chs: int, pool: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(True)
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.bn(self.conv(x))))


class PlainConvNet(SmallCNN):
    """One ConvBlock per entry of `widths`; `pools[i]` says whether block i halves the resolution."""

    def __init__(
        self, widths: tuple[int, ...], pools: tuple[bool, ...], num_classes: int = 10, in_chans: int = 3, **kwargs
    ) -> None:
        if len(widths) != len(pools):
            raise ValueError(f"widths and pools must have one entry per block, got {len(widths)} and {len(pools)}")
        chans = (in_chans, *widths)
        blocks = nn.Sequential(*(ConvBlock(chans[i], chans[i + 1], pool) for i, pool in enumerate(pools)))
        super().__init__(nn.Identity(), blocks, widths[-1], num_classes, **kwargs)


default_cfgs = generate_default_cfgs({name: paper_cfg("blocks.0.conv") for name in ("conv4", "conv6", "vgg9")})


def _create(variant: str, pretrained: bool, widths, pools, **kwargs) -> PlainConvNet:
    return build_model_with_cfg(PlainConvNet, variant, pretrained, widths=widths, pools=pools, **kwargs)


@register_model
def conv4(pretrained: bool = False, **kwargs) -> PlainConvNet:
    """Conv-4: four 64-channel conv blocks, each followed by 2x2 max pooling."""
    return _create("conv4", pretrained, (64,) * 4, (True,) * 4, **kwargs)


@register_model
def conv6(pretrained: bool = False, **kwargs) -> PlainConvNet:
    """Conv-6: six 64-channel conv blocks, max pooling after the first four."""
    return _create("conv6", pretrained, (64,) * 6, (True,) * 4 + (False,) * 2, **kwargs)


@register_model
def vgg9(pretrained: bool = False, **kwargs) -> PlainConvNet:
    """VGG-9: VGG-11's eight conv layers (64, 128, 256x2, 512x4; five max pools) and one linear classifier."""
    widths = (64, 128, 256, 256, 512, 512, 512, 512)
    pools = (True, True, False, True, False, True, False, True)
    return _create("vgg9", pretrained, widths, pools, **kwargs)
