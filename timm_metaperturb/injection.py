"""Putting MetaPerturb into any CNN, and taking it out again, without renaming a single module.

φ is registered once, as `model.metaperturb` (a `MetaPerturbInjection`: φ, the running statistics of every
site, the annealing strength), and applied by forward hooks (see `sites.py`): the base model's state_dict keys
stay exactly as they were, and φ and the sites' statistics appear under the one prefix `metaperturb.`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import ClassVar

import torch
from torch import nn

from .discovery import BlocksSpec, Site, discover_sites
from .loading import PhiSource, load_phi
from .phi import MetaPerturb, RunMode, SiteStatistics
from .recalibration import recalibrate_batchnorm
from .sites import SiteModule, attach, attached, detach

ATTRIBUTE = "metaperturb"
ANNEAL = 0.4  # the paper's schedule: the strength k rises from 0 to 1 over the first 40% of training


def annealed_strength(step: int, steps: int, anneal: float = ANNEAL) -> float:
    """k = min(1, step / (anneal * steps)): 0 at the start, 1 from `anneal` of the way on (always 1 if anneal is 0)."""
    return 1.0 if anneal <= 0 else min(1.0, step / (anneal * steps))


class MetaPerturbInjection(SiteModule):
    """What `inject_metaperturb` registers on a network: the one φ, the running statistics of each site, the
    annealing strength k and how φ runs for this network (`mode`: evaluation noise, components, kernels). φ itself
    is only read, so several networks can share one φ and each keep its own settings."""

    CONFIG_FIELDS: ClassVar[dict[str, str]] = {"phi": "phi", "anneal": "anneal"}

    def __init__(
        self,
        phi: MetaPerturb,
        sites: list[Site],
        strength: float = 1.0,
        anneal: float = ANNEAL,
        placement: str = "pre_activation",
    ) -> None:
        super().__init__(sites)
        self.phi = phi
        self.placement = placement  # how the sites were found, for save_pretrained
        self.sites = nn.ModuleDict({s.key: SiteStatistics(s.channels, phi.h_dim) for s in sites})
        self.strength = strength
        self.anneal = anneal
        # the evaluation noise, in the state so that a saved network keeps its evaluation (see `mode`)
        self.register_buffer("eval_noise_mean", torch.tensor(False))
        self.mode = RunMode()
        self.heights: dict[str, int] = {}  # each site's latest feature-map height, for `scales`
        self.register_load_state_dict_post_hook(MetaPerturbInjection._eval_noise_from_state)

    @property
    def mode(self) -> RunMode:
        """How φ runs for this network; its evaluation noise is also kept in the state (`eval_noise_mean`)."""
        return self._mode

    @mode.setter
    def mode(self, mode: RunMode) -> None:
        self._mode = mode
        self.eval_noise_mean.fill_(mode.eval_noise == "mean")

    def _eval_noise_from_state(self, incompatible_keys) -> None:
        self._mode = replace(self._mode, eval_noise="mean" if bool(self.eval_noise_mean) else "sample")

    def set_progress(self, step: int, total_steps: int) -> None:
        self.strength = annealed_strength(step, total_steps, self.anneal)

    def perturb(self, site: Site, h):
        self.heights[site.key] = h.shape[-2]
        return self.phi(h, self.sites[site.key], self.strength, site=site.name, mode=self.mode, training=self.training)

    @torch.no_grad()
    def scales(self) -> dict[str, torch.Tensor]:
        """The per-channel scale s of every site that has run, from its running statistics (as at eval)."""
        return {
            site.name: self.phi.scale(stats.running_mean.float(), stats.running_var.float(), self.heights[site.key])
            for site in self.site_list
            if site.key in self.heights
            for stats in (self.sites[site.key],)
        }

    def extra_repr(self) -> str:
        schedule = f", step={self._steps_taken}/{self.total_steps}" if self.total_steps else ""
        return f"strength={self.strength}{schedule}, sites={len(self.site_list)}, eval_noise={self.mode.eval_noise}"


def inject_metaperturb(
    model: nn.Module,
    phi: PhiSource = None,
    *,
    blocks: BlocksSpec = None,
    placement: str = "pre_activation",
    input_size: tuple[int, int, int] | None = None,
    strength: float = 1.0,
    total_steps: int | None = None,
    anneal: float = ANNEAL,
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
        strength: a fixed annealing coefficient k in [0, 1] (without `total_steps`); change it later with
            `set_perturb_strength`.
        total_steps: the length of training in optimizer steps: k then follows the paper's schedule by itself,
            rising from 0 to 1 over the first `anneal` of them, counted from the optimizer's steps (see
            `timm_metaperturb.schedule`), so the training loop needs no call.
        anneal: the fraction of `total_steps` over which k rises from 0 to 1.
        train_phi: leave φ's parameters trainable (meta-training); by default they are frozen.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"inject_metaperturb needs a torch.nn.Module, got {type(model).__name__}")
    if isinstance(getattr(model, ATTRIBUTE, None), MetaPerturbInjection):
        raise ValueError("this model already has MetaPerturb; call remove_metaperturb(model) before injecting again")
    _check_strength(strength)
    if total_steps is not None and strength != 1.0:
        raise ValueError("pass either a fixed strength or total_steps (a schedule that sets the strength), not both")
    phi = load_phi(phi)
    sites = discover_sites(model, blocks=blocks, placement=placement, input_size=input_size)
    phi.requires_grad_(train_phi)
    injection = MetaPerturbInjection(phi, sites, strength, anneal, placement)
    injection.schedule(total_steps)
    return attach(model, injection, ATTRIBUTE)


def get_injection(model: nn.Module) -> MetaPerturbInjection:
    """The MetaPerturb a model carries, or a clear error when it carries none."""
    how = "inject_metaperturb(model) or timm_metaperturb.create_model(name, metaperturb=True)"
    return attached(model, ATTRIBUTE, MetaPerturbInjection, how)


def remove_metaperturb(model: nn.Module) -> MetaPerturb:
    """Undo `inject_metaperturb`: remove every hook and `model.metaperturb`; return φ."""
    get_injection(model)
    return detach(model, ATTRIBUTE).phi


def _check_strength(strength: float) -> None:
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"the perturbation strength k must lie in [0, 1], got {strength}")


def set_eval_noise(model: nn.Module, mode: str, recalibrate: Iterable[torch.Tensor] | None = None) -> None:
    """How φ treats its noise at eval: "sample" (the reference: average several stochastic passes) or "mean"
    (the noise replaced by its expectation: one deterministic pass). With "mean", pass `recalibrate` (batches
    of preprocessed training inputs) to re-estimate batch norm's statistics in that mode, without which the
    deterministic pass loses accuracy (see `recalibrate_batchnorm`)."""
    injection = get_injection(model)
    injection.mode = replace(injection.mode, eval_noise=mode)  # validates the mode
    if recalibrate is not None:
        recalibrate_batchnorm(model, recalibrate)


def finalize_for_inference(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Put a network trained with MetaPerturb in its default evaluation for good, and return it in eval mode: φ's
    noise replaced by its expectation (one deterministic pass) and batch norm's statistics re-estimated in that mode
    on `batches` (preprocessed training inputs without augmentation, as for `recalibrate_batchnorm`). Both are kept
    in the model's state, so after saving and loading, `model.eval()` gives the same predictions with no data and
    no further call."""
    set_eval_noise(model, "mean", recalibrate=batches)
    return model.eval()


def set_perturb_strength(model: nn.Module, strength: float) -> None:
    """Fix the annealing coefficient k of every site of `model` at once. It stays fixed: a schedule given by
    `total_steps` no longer moves it (`get_injection(model).schedule(total_steps)` hands it back)."""
    _check_strength(strength)
    injection = get_injection(model)
    injection.schedule(None)
    injection.strength = float(strength)


@contextmanager
def eval_noise_as(model: nn.Module, mode: str) -> Iterator[None]:
    """`set_eval_noise(model, mode)` for the duration of a `with` block; the previous mode comes back even when
    the block raises."""
    injection = get_injection(model)
    previous = injection.mode
    set_eval_noise(model, mode)
    try:
        yield
    finally:
        injection.mode = previous
