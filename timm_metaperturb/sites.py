"""Applying a module at every site of a network through forward hooks, without renaming any module.

A `SiteModule` (MetaPerturb, or one of the baseline regularizers) is registered once on the network under an
attribute name; hooks on the network's own modules call its `perturb(site, h)`. The base model's state_dict
keys stay exactly as they were, so pretrained weights still load, and the attached module's own state appears
under its one prefix. Hooks are small objects rather than closures so that `copy.deepcopy` and pickling carry a
working network along.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .discovery import Site
from .schedule import Scheduled, WatchNetwork


class SiteModule(Scheduled):
    """Base of what is applied at sites. Subclasses implement `perturb(site, h)`, h a (B, C, H, W) map, and
    optionally `set_progress(step, total_steps)` for a schedule, which follows the network's optimizer steps
    (`schedule.py`).

    Its forward passes its input through unchanged, so that an nn.Sequential network, which runs every child
    in turn, keeps computing what it computed before (an attached module comes last). A checkpoint of the
    network without this module's keys at all (a plain pretrained checkpoint) loads strictly and leaves this
    module's state as it is; a checkpoint with some of its keys but not all still fails.
    """

    def __init__(self, sites: list[Site]) -> None:
        super().__init__()
        self.site_list = list(sites)
        self._checkpoint_had_keys = True
        self.register_load_state_dict_post_hook(SiteModule._forgive_plain_checkpoint)

    # options of `add_regularizer` that a training config supplies, {argument: config field}
    CONFIG_FIELDS: ClassVar[dict[str, str]] = {}

    def perturb(self, site: Site, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- the training loop's protocol: every part optional, so a loop needs no method names ---------------------

    def transform_batch(self, x: torch.Tensor) -> torch.Tensor:
        """The training batch's input before the forward (a mixing method plans and mixes here)."""
        return x

    def task_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """The training loss in place of cross-entropy (mixed targets), or None."""
        return None

    def extra_loss(self) -> torch.Tensor | None:
        """A penalty to add to the training loss after the forward (a KL term), or None."""
        return None

    def forward(self, x):
        return x

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._load_prefix = prefix
        self._checkpoint_had_keys = any(k.startswith(prefix) for k in state_dict)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _forgive_plain_checkpoint(self, incompatible_keys) -> None:
        if not self._checkpoint_had_keys:
            incompatible_keys.missing_keys[:] = [
                k for k in incompatible_keys.missing_keys if not k.startswith(self._load_prefix)
            ]


def _perturb(owner: SiteModule, site: Site, h: torch.Tensor) -> torch.Tensor:
    """The owner perturbs h as the (B, C, H, W) map it is, whichever dimension holds its channels (a view, no
    copy: a (B, H, W, C) map reaches the owner channels-last)."""
    if site.channels_dim == 1:
        return owner.perturb(site, h)
    return owner.perturb(site, h.movedim(site.channels_dim, 1)).movedim(1, site.channels_dim)


class _PerturbOutput:
    """Forward hook: the owner perturbs the module's output."""

    def __init__(self, owner: SiteModule, site: Site) -> None:
        self.owner, self.site = owner, site

    def __call__(self, module, args, output):
        return _perturb(self.owner, self.site, output)


class _PerturbInput:
    """Forward pre-hook: the owner perturbs the module's input on the site's call within a pass through the
    block (a closing ReLU module may also run earlier in the same block, as in torchvision's BasicBlock)."""

    def __init__(self, owner: SiteModule, site: Site) -> None:
        self.owner, self.site, self.calls = owner, site, 0

    def __call__(self, module, args):
        self.calls += 1
        if self.calls == self.site.call:
            return (_perturb(self.owner, self.site, args[0]), *args[1:])
        return None


class _StartPass:
    """Forward pre-hook on a block's first module: a new pass through the block starts the call count."""

    def __init__(self, counter: _PerturbInput) -> None:
        self.counter, self.owner = counter, counter.owner

    def __call__(self, module, args):
        self.counter.calls = 0


HOOK_TYPES = (_PerturbOutput, _PerturbInput, _StartPass, WatchNetwork)


def attach(model: nn.Module, owner: SiteModule, attribute: str) -> nn.Module:
    """Register `owner` as `model.<attribute>` and hook it onto each of its sites; return the model."""
    if hasattr(model, attribute):
        existing = getattr(model, attribute)
        detail = f" (a {type(existing).__name__}; remove it first)" if isinstance(existing, SiteModule) else ""
        raise ValueError(f"the model already has an attribute '{attribute}'{detail}")
    param = next(model.parameters(), None)
    if param is not None:
        owner.to(param.device)
    model.add_module(attribute, owner)
    owner.watch(model)
    model.register_forward_pre_hook(WatchNetwork(owner))
    modules = dict(model.named_modules())
    for site in owner.site_list:
        target = modules[site.target]
        if site.position == "output":
            target.register_forward_hook(_PerturbOutput(owner, site))
        else:
            counter = _PerturbInput(owner, site)
            modules[site.scope[0]].register_forward_pre_hook(_StartPass(counter))
            target.register_forward_pre_hook(counter)
    return model


def attached(model: nn.Module, attribute: str, kind: type[SiteModule], how: str) -> SiteModule:
    """`model.<attribute>` if it is a `kind`, else an error that says how to add one (`how`)."""
    owner = getattr(model, attribute, None)
    if not isinstance(owner, kind):
        raise ValueError(f"{type(model).__name__} has no {kind.__name__}: add it with {how}")
    return owner


def detach(model: nn.Module, attribute: str) -> SiteModule:
    """Undo `attach`: remove the owner's hooks and `model.<attribute>`; return the owner."""
    owner = getattr(model, attribute)
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key in [k for k, h in hooks.items() if isinstance(h, HOOK_TYPES) and h.owner is owner]:
                del hooks[key]
    delattr(model, attribute)
    return owner
