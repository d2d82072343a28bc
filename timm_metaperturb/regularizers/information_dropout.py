"""Information dropout (Achille & Soatto, 2018): learned multiplicative log-normal noise plus a KL penalty."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..discovery import Site
from ..sites import SiteModule


class InformationDropout(SiteModule):
    """h * exp(α(h) ε), ε ~ N(0, 1), with α(h) = α_max sigmoid(conv3x3(h)) learned at each site; `kl()` gives
    the mean of -log(α / α_max), the KL term for ReLU activations under a log-uniform prior, to add to the loss
    times β. Deterministic (no noise) at eval."""

    CONFIG_FIELDS: ClassVar[dict[str, str]] = {"alpha_max": "info_alpha_max", "beta": "info_beta"}

    def __init__(self, sites: list[Site], alpha_max: float = 0.7, beta: float = 0.1) -> None:
        super().__init__(sites)
        self.alpha_max, self.beta = alpha_max, beta
        self.alpha_logits = nn.ModuleDict({s.key: nn.Conv2d(s.channels, s.channels, 3, padding=1) for s in sites})
        self._kl_terms: list[torch.Tensor] = []

    def perturb(self, site: Site, h: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return h
        logits = self.alpha_logits[site.key](h)
        self._kl_terms.append(-F.logsigmoid(logits).mean())
        return h * torch.exp(self.alpha_max * torch.sigmoid(logits) * torch.randn_like(h))

    def kl(self) -> torch.Tensor:
        """The mean KL term of the sites run since the last call (0 if none ran in training)."""
        terms, self._kl_terms = self._kl_terms, []
        return torch.stack(terms).mean() if terms else torch.zeros(())

    def extra_loss(self) -> torch.Tensor:
        return self.beta * self.kl()

    def extra_repr(self) -> str:
        return f"alpha_max={self.alpha_max}, beta={self.beta}, sites={len(self.site_list)}"
