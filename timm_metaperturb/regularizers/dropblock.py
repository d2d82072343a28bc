"""DropBlock (Ghiasi et al., 2018): timm's DropBlock2d at every site, its drop probability ramped up over training."""

from __future__ import annotations

from typing import ClassVar

import torch
from timm.layers import DropBlock2d

from ..discovery import Site
from ..sites import SiteModule


class DropBlock(SiteModule):
    """timm's DropBlock2d at every site; the drop probability is `drop_prob * strength`, `strength` ramped from
    0 to 1 over training (the training progress), as the DropBlock paper schedules it."""

    CONFIG_FIELDS: ClassVar[dict[str, str]] = {"drop_prob": "dropblock_prob", "block_size": "dropblock_size"}

    def __init__(self, sites: list[Site], drop_prob: float = 0.1, block_size: int = 3) -> None:
        super().__init__(sites)
        self.drop_prob, self.strength = drop_prob, 1.0
        self.drop = DropBlock2d(drop_prob=drop_prob, block_size=block_size)

    def set_progress(self, step: int, total_steps: int) -> None:
        self.strength = min(1.0, step / total_steps)

    def perturb(self, site: Site, h: torch.Tensor) -> torch.Tensor:
        self.drop.drop_prob = self.drop_prob * self.strength
        return self.drop(h)
