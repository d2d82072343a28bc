"""The baseline regularizers the paper compares against, placed at the same sites as MetaPerturb (after every
block, found by `discovery.py`) so that they too work on any CNN and compare like for like.

- `InformationDropout` (Achille & Soatto, 2018): learned multiplicative log-normal noise plus a KL penalty.
- `DropBlock` (Ghiasi et al., 2018): timm's DropBlock2d, its drop probability ramped up by a strength.
- `ManifoldMixup` (Verma et al., 2019): mix hidden states (or inputs) of pairs of examples at one layer chosen
  at random per batch, and their targets with the same λ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropBlock2d
from torch import nn

from .discovery import BlocksSpec, Site, discover_sites
from .sites import SiteModule, attach


class InformationDropout(SiteModule):
    """h * exp(α(h) ε), ε ~ N(0, 1), with α(h) = α_max sigmoid(conv3x3(h)) learned at each site; `kl()` gives
    the mean of -log(α / α_max), the KL term for ReLU activations under a log-uniform prior, to add to the loss
    times β. Deterministic (no noise) at eval."""

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

    def extra_repr(self) -> str:
        return f"alpha_max={self.alpha_max}, beta={self.beta}, sites={len(self.site_list)}"


class DropBlock(SiteModule):
    """timm's DropBlock2d at every site; the drop probability is `drop_prob * strength` (ramp `strength` from
    0 to 1 over training, as the DropBlock paper schedules it)."""

    def __init__(self, sites: list[Site], drop_prob: float = 0.1, block_size: int = 3) -> None:
        super().__init__(sites)
        self.drop_prob, self.strength = drop_prob, 1.0
        self.drop = DropBlock2d(drop_prob=drop_prob, block_size=block_size)

    def perturb(self, site: Site, h: torch.Tensor) -> torch.Tensor:
        self.drop.drop_prob = self.drop_prob * self.strength
        return self.drop(h)


class ManifoldMixup(SiteModule):
    """Before each training forward, `draw(batch_size)` picks the layer (the input or one of the sites), λ ~
    Beta(α, α) and a pairing of the batch; `mix_input(x)` mixes the input when the input was picked, the site's
    hook mixes its hidden state otherwise; `loss(logits, y)` mixes the targets with the same λ."""

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

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        perm = self.perm.to(y.device)
        return self.lam * F.cross_entropy(logits, y) + (1 - self.lam) * F.cross_entropy(logits, y[perm])


REGULARIZERS: dict[str, type[SiteModule]] = {
    "information_dropout": InformationDropout,
    "dropblock": DropBlock,
    "manifold_mixup": ManifoldMixup,
}


def add_regularizer(
    model: nn.Module,
    name: str,
    *,
    blocks: BlocksSpec = None,
    placement: str = "pre_activation",
    input_size: tuple[int, int, int] | None = None,
    **options,
) -> SiteModule:
    """Attach the baseline `name` at the sites MetaPerturb would use (registered as `model.<name>`); return it."""
    if name not in REGULARIZERS:
        raise ValueError(f"unknown regularizer '{name}'; choose from {sorted(REGULARIZERS)}")
    sites = discover_sites(model, blocks=blocks, placement=placement, input_size=input_size)
    owner = REGULARIZERS[name](sites, **options)
    attach(model, owner, name)
    return owner
