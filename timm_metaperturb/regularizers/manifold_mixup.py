"""Manifold Mixup (Verma et al., 2019): mix hidden states (or inputs) of pairs of examples at one layer chosen at
random per batch, and their targets with the same λ."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from ..discovery import Site
from ..sites import SiteModule


class ManifoldMixup(SiteModule):
    """Before each training forward, `transform_batch(x)` draws the layer (the input or one of the sites), λ ~
    Beta(α, α) and a pairing of the batch (`draw`), and mixes the input when the input was picked; the site's hook
    mixes its hidden state otherwise; `task_loss(logits, y)` mixes the targets with the same λ."""

    CONFIG_FIELDS: ClassVar[dict[str, str]] = {"alpha": "mixup_alpha"}

    def __init__(self, sites: list[Site], alpha: float = 2.0) -> None:
        super().__init__(sites)
        self.alpha = alpha
        self.layer, self.lam, self.perm = None, 1.0, None

    def draw(self, batch_size: int) -> tuple[int, float, torch.Tensor]:
        """Plan the next forward's mix (from torch's global RNG): layer 0 is the input, layer i the i-th site."""
        self.layer = int(torch.randint(len(self.site_list) + 1, (1,)))
        self.lam = float(torch.distributions.Beta(self.alpha, self.alpha).sample())
        self.perm = torch.randperm(batch_size)
        return self.layer, self.lam, self.perm

    def _mix(self, h: torch.Tensor) -> torch.Tensor:
        return self.lam * h + (1 - self.lam) * h[self.perm.to(h.device)]

    def mix_input(self, x: torch.Tensor) -> torch.Tensor:
        return self._mix(x) if self.training and self.layer == 0 else x

    def perturb(self, site: Site, h: torch.Tensor) -> torch.Tensor:
        if self.training and self.layer is not None and self.site_list[self.layer - 1] is site:
            return self._mix(h)
        return h

    def transform_batch(self, x: torch.Tensor) -> torch.Tensor:
        self.draw(len(x))
        return self.mix_input(x)

    def task_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        perm = self.perm.to(y.device)
        return self.lam * F.cross_entropy(logits, y) + (1 - self.lam) * F.cross_entropy(logits, y[perm])
