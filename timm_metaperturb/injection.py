"""Putting MetaPerturb into any CNN, and taking it out again, without renaming a single module.

φ is registered once, as `model.metaperturb` (a `MetaPerturbInjection`: φ, the running statistics of every
site, the annealing strength). Forward hooks on the network's own modules apply it, so the base model's
state_dict keys stay exactly as they were and pretrained weights still load; φ and the sites' statistics
appear under the one prefix `metaperturb.`. Hooks are small objects rather than closures so that
`copy.deepcopy` and pickling carry a working injection along.
"""

from __future__ import annotations

from torch import nn

from .discovery import BlocksSpec, Site, discover_sites
from .loading import PhiSource, load_phi
from .phi import MetaPerturb, SiteStatistics

ATTRIBUTE = "metaperturb"


class MetaPerturbInjection(nn.Module):
    """What `inject_metaperturb` registers on a network: the one φ and the running statistics of each site.

    Its forward passes its input through unchanged, so that an nn.Sequential network, which runs every
    child in turn, keeps computing what it computed before (this module comes last).
    """

    def __init__(self, phi: MetaPerturb, sites: list[Site], strength: float = 1.0) -> None:
        super().__init__()
        self.phi = phi
        self.sites = nn.ModuleDict({s.key: SiteStatistics(s.channels, phi.h_dim) for s in sites})
        self.site_list = list(sites)
        self.strength = strength
        self._checkpoint_had_keys = True
        self.register_load_state_dict_post_hook(MetaPerturbInjection._forgive_plain_checkpoint)

    def forward(self, x):
        return x

    def perturb(self, site: Site, h):
        return self.phi(h, self.sites[site.key], self.strength, site=site.name)

    def extra_repr(self) -> str:
        return f"strength={self.strength}, sites={len(self.site_list)}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._load_prefix = prefix
        self._checkpoint_had_keys = any(k.startswith(prefix) for k in state_dict)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _forgive_plain_checkpoint(self, incompatible_keys) -> None:
        """A checkpoint of the plain network (no `metaperturb.` keys at all) loads strictly: φ and the
        statistics keep their values. A checkpoint that has some of them but not all still fails."""
        if not self._checkpoint_had_keys:
            incompatible_keys.missing_keys[:] = [
                k for k in incompatible_keys.missing_keys if not k.startswith(self._load_prefix)
            ]


class _PerturbOutput:
    """Forward hook: φ perturbs the module's output."""

    def __init__(self, injection: MetaPerturbInjection, site: Site) -> None:
        self.injection, self.site = injection, site

    def __call__(self, module, args, output):
        return self.injection.perturb(self.site, output)


class _PerturbInput:
    """Forward pre-hook: φ perturbs the module's input on the site's call within a pass through the block
    (a closing ReLU module may also run earlier in the same block, as in torchvision's BasicBlock)."""

    def __init__(self, injection: MetaPerturbInjection, site: Site) -> None:
        self.injection, self.site, self.calls = injection, site, 0

    def __call__(self, module, args):
        self.calls += 1
        if self.calls == self.site.call:
            return (self.injection.perturb(self.site, args[0]), *args[1:])
        return None


class _StartPass:
    """Forward pre-hook on a block's first module: a new pass through the block starts the call count."""

    def __init__(self, counter: _PerturbInput) -> None:
        self.counter = counter

    def __call__(self, module, args):
        self.counter.calls = 0


HOOK_TYPES = (_PerturbOutput, _PerturbInput, _StartPass)


def inject_metaperturb(
    model: nn.Module,
    phi: PhiSource = None,
    *,
    blocks: BlocksSpec = None,
    placement: str = "pre_activation",
    input_size: tuple[int, int, int] | None = None,
    strength: float = 1.0,
    train_phi: bool = False,
) -> nn.Module:
    """Add MetaPerturb after every block of `model`, in place, and return it.

    Args:
        model: any CNN (timm, torchvision or hand-written).
        phi: a MetaPerturb, a folder or `.safetensors` file saved by `save_pretrained`, the authors' `.pth`
            checkpoint, a Hub repo id, or None for the package's default φ.
        blocks: override the block discovery: module names, a regex matched against module names, or module
            types (see `timm_metaperturb.discovery`).
        placement: "pre_activation" (before each block's closing activation when it has one, else at its
            output; the authors' placement) or "output" (always at the block's output).
        input_size: (C, H, W) of the dummy batch that probes the network; defaults to the timm config's.
        strength: the annealing coefficient k in [0, 1]; change it later with `set_perturb_strength`.
        train_phi: leave φ's parameters trainable (meta-training); by default they are frozen.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"inject_metaperturb needs a torch.nn.Module, got {type(model).__name__}")
    if isinstance(getattr(model, ATTRIBUTE, None), MetaPerturbInjection):
        raise ValueError("this model already has MetaPerturb; call remove_metaperturb(model) before injecting again")
    if hasattr(model, ATTRIBUTE):
        raise ValueError(f"the model already has an attribute '{ATTRIBUTE}', where MetaPerturb registers φ")
    _check_strength(strength)
    phi = load_phi(phi)
    sites = discover_sites(model, blocks=blocks, placement=placement, input_size=input_size)
    injection = MetaPerturbInjection(phi, sites, strength)
    param = next(model.parameters(), None)
    if param is not None:
        injection.to(param.device)
    phi.requires_grad_(train_phi)
    model.add_module(ATTRIBUTE, injection)
    modules = dict(model.named_modules())
    for site in sites:
        target = modules[site.target]
        if site.position == "output":
            target.register_forward_hook(_PerturbOutput(injection, site))
        else:
            counter = _PerturbInput(injection, site)
            modules[site.scope[0]].register_forward_pre_hook(_StartPass(counter))
            target.register_forward_pre_hook(counter)
    return model


def get_injection(model: nn.Module) -> MetaPerturbInjection:
    """The MetaPerturb a model carries, or a clear error when it carries none."""
    injection = getattr(model, ATTRIBUTE, None)
    if not isinstance(injection, MetaPerturbInjection):
        raise ValueError(
            f"{type(model).__name__} has no MetaPerturb: add it with inject_metaperturb(model) or "
            "timm_metaperturb.create_model(name, metaperturb=True)"
        )
    return injection


def remove_metaperturb(model: nn.Module) -> MetaPerturb:
    """Undo `inject_metaperturb`: remove every hook and `model.metaperturb`; return φ."""
    injection = get_injection(model)
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key in [k for k, hook in hooks.items() if isinstance(hook, HOOK_TYPES)]:
                del hooks[key]
    delattr(model, ATTRIBUTE)
    return injection.phi


def _check_strength(strength: float) -> None:
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"the perturbation strength k must lie in [0, 1], got {strength}")


def set_perturb_strength(model: nn.Module, strength: float) -> None:
    """Set the annealing coefficient k of every site of `model` at once."""
    _check_strength(strength)
    get_injection(model).strength = float(strength)
