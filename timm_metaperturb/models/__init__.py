"""The paper's networks, registered in timm on import: resnet20/32/44/56, wrn28_2, conv4, conv6, vgg9."""

from .plain import ConvBlock, PlainConvNet
from .residual import BasicBlock, CifarResNet, PreActBlock, WideResNet
from .small_cnn import SmallCNN

__all__ = ["BasicBlock", "CifarResNet", "ConvBlock", "PlainConvNet", "PreActBlock", "SmallCNN", "WideResNet"]
