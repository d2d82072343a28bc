"""The skeleton the paper's networks share, with timm's model interface: stem -> blocks -> head."""

from __future__ import annotations

import torch
from timm.layers import create_classifier
from timm.models import checkpoint_seq
from torch import nn


def paper_cfg(first_conv: str, **kwargs) -> dict:
    """Pretrained config of a CIFAR-style network: 32x32 inputs (any size works), mean/std 0.5, no weights."""
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "first_conv": first_conv,
        "classifier": "fc",
        "paper_ids": "arXiv:2006.07540",
        **kwargs,
    }


class SmallCNN(nn.Module):
    """`stem`, then `blocks` (one nn.Sequential of blocks, which is where MetaPerturb goes), then `final`
    (e.g. a pre-activation network's last norm and ReLU), global pooling and a linear classifier."""

    def __init__(
        self,
        stem: nn.Module,
        blocks: nn.Sequential,
        num_features: int,
        num_classes: int = 10,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        final: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = num_features
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.stem = stem
        self.blocks = blocks
        self.final = final if final is not None else nn.Identity()
        self.global_pool, self.fc = create_classifier(num_features, num_classes, pool_type=global_pool)
        self.head_drop = nn.Dropout(drop_rate)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^stem", "blocks": r"^blocks\.(\d+)"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.final(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
