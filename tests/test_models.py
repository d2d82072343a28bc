"""The paper's networks, registered in timm."""

import pytest
import timm
import torch

import timm_metaperturb  # noqa: F401  (registers the models)

PAPER_MODELS = ["resnet20", "resnet32", "resnet44", "resnet56", "wrn28_2", "conv4", "conv6", "vgg9"]


def cifar_resnet_parameters(depth: int, num_classes: int = 10) -> int:
    """ResNet-(6n+2) with option-A shortcuts, counted from its layers: 3x3 convs without bias, BN weight+bias."""
    n = (depth - 2) // 6
    total = 3 * 16 * 9 + 2 * 16  # stem
    in_chs = 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += in_chs * width * 9 + width * width * 9 + 4 * width
            in_chs = width
    return total + 64 * num_classes + num_classes


def test_registered_in_timm():
    assert set(PAPER_MODELS) <= set(timm.list_models())
    assert timm.create_model("resnet20").pretrained_cfg["input_size"] == (3, 32, 32)


@pytest.mark.parametrize("depth", [20, 32, 44, 56])
def test_cifar_resnet_parameter_counts(depth):
    model = timm.create_model(f"resnet{depth}")
    assert sum(p.numel() for p in model.parameters()) == cifar_resnet_parameters(depth)


def test_parameter_counts_of_the_others():
    counts = {name: sum(p.numel() for p in timm.create_model(name).parameters()) for name in PAPER_MODELS}
    assert 0.26e6 < counts["resnet20"] < 0.28e6
    assert counts["wrn28_2"] == 1_467_610  # as published for WRN-28-2 on CIFAR-10
    conv_block = 64 * 64 * 9 + 2 * 64
    assert counts["conv4"] == 3 * 64 * 9 + 2 * 64 + 3 * conv_block + 64 * 10 + 10
    assert counts["conv6"] == counts["conv4"] + 2 * conv_block
    assert 9.0e6 < counts["vgg9"] < 9.5e6


@pytest.mark.parametrize("name", PAPER_MODELS)
@pytest.mark.parametrize("size", [32, 84])
def test_forward_any_size_and_timm_interface(name, size):
    model = timm.create_model(name, num_classes=7)
    x = torch.randn(2, 3, size, size)
    assert model(x).shape == (2, 7)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, model.num_features)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.set_grad_checkpointing(True)
    model.train()(x).sum().backward()


def test_in_chans_and_bad_depth():
    assert timm.create_model("resnet20", in_chans=1)(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    from timm_metaperturb.models import CifarResNet

    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(depth=21)
