"""Regularizers attached at the sites MetaPerturb uses (after every block, found by `discovery.py`), so that
they work on any CNN and compare like for like: MetaPerturb itself and the paper's baselines.

Each is a `SiteModule` and takes part in training through the same small protocol (`sites.py`): a training
progress for its schedule, an optional batch transform, an optional task loss and an optional extra loss. A new
regularizer is one module here and one entry in `REGULARIZERS`.

- `metaperturb`: φ (`injection.py`).
- `information_dropout` (Achille & Soatto, 2018), `dropblock` (Ghiasi et al., 2018), `manifold_mixup` (Verma
  et al., 2019).
"""

from __future__ import annotations

from torch import nn

from ..discovery import BlocksSpec, discover_sites
from ..injection import ATTRIBUTE, MetaPerturbInjection, inject_metaperturb, remove_metaperturb
from ..sites import SiteModule, attach, attached, detach
from .dropblock import DropBlock
from .information_dropout import InformationDropout
from .manifold_mixup import ManifoldMixup

REGULARIZERS: dict[str, type[SiteModule]] = {
    ATTRIBUTE: MetaPerturbInjection,
    "information_dropout": InformationDropout,
    "dropblock": DropBlock,
    "manifold_mixup": ManifoldMixup,
}


def _check_name(name: str) -> None:
    if name not in REGULARIZERS:
        raise ValueError(f"unknown regularizer '{name}'; choose from {sorted(REGULARIZERS)}")


def add_regularizer(
    model: nn.Module,
    name: str,
    *,
    blocks: BlocksSpec = None,
    placement: str = "pre_activation",
    input_size: tuple[int, int, int] | None = None,
    total_steps: int | None = None,
    **options,
) -> nn.Module:
    """Attach the regularizer `name` at the sites MetaPerturb would use, registered as `model.<name>`; return the
    model. With `total_steps` (the length of training in optimizer steps) its schedule, if it has one, follows the
    optimizer's steps by itself (`schedule.py`). `add_regularizer(model, "metaperturb", phi=...)` is
    `inject_metaperturb(model, phi=...)`."""
    _check_name(name)
    sites_of = {"blocks": blocks, "placement": placement, "input_size": input_size}
    if name == ATTRIBUTE:
        return inject_metaperturb(model, total_steps=total_steps, **sites_of, **options)
    owner = REGULARIZERS[name](discover_sites(model, **sites_of), **options)
    owner.schedule(total_steps)
    return attach(model, owner, name)


def get_regularizer(model: nn.Module, name: str) -> SiteModule:
    """The regularizer `name` attached to `model`, or an error that says how to attach it."""
    _check_name(name)
    return attached(model, name, REGULARIZERS[name], f'add_regularizer(model, "{name}")')


def remove_regularizer(model: nn.Module, name: str) -> SiteModule:
    """Undo `add_regularizer`: remove the hooks and `model.<name>`; return what was attached."""
    get_regularizer(model, name)
    return remove_metaperturb(model) if name == ATTRIBUTE else detach(model, name)


__all__ = ["REGULARIZERS", "DropBlock", "InformationDropout", "ManifoldMixup", "add_regularizer", "get_regularizer",
           "remove_regularizer"]  # fmt: skip
