"""Batch statistics synchronised across data-parallel processes, so that N processes compute what one would.

Batch norm and φ's scale both summarise a batch by its mean and variance. Under data-parallel training each
process sees part of the global batch and, by default, summarises its own part (batch norm's convention under
DistributedDataParallel). Inside `synchronised()`, the networks prepared with `synchronise_batchnorm` and φ take
their moments over the global batch instead: all-reduced with gradients flowing back (`torch.distributed.nn`), on
any backend (gloo on CPU processes too, where torch's SyncBatchNorm does not run), like SyncBatchNorm.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

_synchronised = False


@contextmanager
def synchronised(enabled: bool = True) -> Iterator[None]:
    """Training forwards inside take batch statistics over every process's images (where enabled)."""
    global _synchronised
    previous, _synchronised = _synchronised, enabled
    try:
        yield
    finally:
        _synchronised = previous


def active() -> bool:
    return _synchronised and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _SumOverProcesses(torch.autograd.Function):
    """The sum of a tensor over every process; the gradient of each process's part is the sum of every process's
    gradient of the result."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        total = x.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


def batch_moments(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean and unbiased variance of x over `dims` and over every process, and the count of values behind them: two
    passes (the global mean, then the squared deviations from it), each one all-reduce that gradients flow back
    through."""
    local = torch.tensor([math.prod(x.shape[d] for d in dims)], device=x.device)
    dist.all_reduce(local)
    count = int(local.item())
    mean = _SumOverProcesses.apply(x.sum(dims, keepdim=True)) / count
    squares = _SumOverProcesses.apply((x - mean).square().sum(dims, keepdim=True))
    return mean, squares / max(count - 1, 1), count


class SynchronisedNorm:
    """Mixed into a batch-norm module's class by `synchronise_batchnorm`: in a synchronised training forward it
    normalises with the global batch's moments (and updates its running estimates with them); otherwise it is the
    module it was. timm's BatchNormAct2d keeps its drop and activation after the normalisation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        mean, var, count = batch_moments(x.float(), (0, 2, 3))
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.flatten().to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(var.flatten().to(self.running_var.dtype), momentum)
        biased = var * ((count - 1) / count)
        y = (x.float() - mean) * torch.rsqrt(biased + self.eps)
        if self.affine:
            y = y * self.weight.float()[None, :, None, None] + self.bias.float()[None, :, None, None]
        y = y.to(x.dtype)
        if hasattr(self, "act"):  # timm's BatchNormAct2d
            y = self.act(self.drop(y))
        return y


def synchronise_batchnorm(model: nn.Module) -> int:
    """Give every BatchNorm2d (and timm's BatchNormAct2d) of `model` synchronised statistics inside
    `synchronised()`, in place: the same parameters, buffers and state_dict keys. Returns how many."""
    count = 0
    for module in model.modules():
        cls = type(module)
        if not isinstance(module, nn.BatchNorm2d) or isinstance(module, SynchronisedNorm):
            continue
        if cls.forward not in (nn.BatchNorm2d.forward, *_timm_norm_act_forwards()):
            raise TypeError(f"cannot synchronise {cls.__name__}: its forward is not BatchNorm2d's or BatchNormAct2d's")
        module.__class__ = type(f"Synchronised{cls.__name__}", (SynchronisedNorm, cls), {})
        count += 1
    return count


def _timm_norm_act_forwards() -> tuple:
    from timm.layers import BatchNormAct2d

    return (BatchNormAct2d.forward,)


def moments_over_batch(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance over dim 0 (φ's scale statistics): over every process's images in a synchronised
    forward, else this process's."""
    if not active():
        return f.mean(0), f.var(0, unbiased=True)
    mean, var, _ = batch_moments(f, (0,))
    return mean[0], var[0]
