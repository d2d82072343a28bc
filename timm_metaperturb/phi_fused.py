"""φ's fused kernels under autograd, for both devices: the C++ kernels on a CPU (`phi_cpu.py`), the Triton
kernels on a CUDA GPU (`phi_cuda.py`). Both take the same arguments, so one autograd code serves both.

Where a device's kernels cannot run (no C++ compiler, no Triton), or with TIMM_METAPERTURB_CPU_KERNELS=0 /
TIMM_METAPERTURB_CUDA_KERNELS=0, φ runs on torch operators instead: the same function, slower.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

import torch

from .phi_cpu import cpu_kernels

CUDA_SWITCH = "TIMM_METAPERTURB_CUDA_KERNELS"
EXPECTED_PERTURBATION = "phi_fused.expected_perturbation"  # the single pass's name in profiles

_is_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling  # the latter: torch < 2.3
_cuda: dict[str, ModuleType | None] = {}


def cuda_kernels() -> ModuleType | None:
    """The Triton kernels; None where switched off or where Triton is missing (warned once)."""
    if os.environ.get(CUDA_SWITCH, "1") == "0":
        return None
    if "kernels" not in _cuda:
        try:
            from . import phi_cuda

            _cuda["kernels"] = phi_cuda
        except ImportError as error:
            warnings.warn(
                f"φ's fused CUDA kernels need Triton ({error}); φ runs on torch operators instead (same results, "
                f"slower). Install triton, or set {CUDA_SWITCH}=0 to skip this attempt.",
                stacklevel=2,
            )
            _cuda["kernels"] = None
    return _cuda["kernels"]


def device_kernels(x: torch.Tensor) -> ModuleType | None:
    """The fused kernels for x's device, None where there are none."""
    if x.device.type == "cpu":
        return cpu_kernels()
    return cuda_kernels() if x.device.type == "cuda" else None


def layout(x: torch.Tensor) -> torch.memory_format:
    """The layout the kernels read x in without a copy: channels-last where x is, else contiguous."""
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def usable(x: torch.Tensor) -> bool:
    """Whether φ can run on the fused kernels for the float32 map x: outside torch.compile (which traces torch
    operators), on a device with kernels that load, and on CUDA for maps the Triton kernels' 32-bit indices reach."""
    if x.is_cuda and x.numel() >= 2**31:
        return False
    return not _is_compiling() and device_kernels(x) is not None


NO_TABLE = (torch.empty(0), torch.empty(0), 0.0, 1.0)  # the expected-softplus table, unused when sampling


class FusedPerturbation(torch.autograd.Function):
    """out = min(((s * softplus(E2(relu(E1(x))) + eps) - 1) * k + 1) * x, clip) on the fused kernels, eps given
    (`noise`, a float map in x's layout) or drawn inside the kernel from a seed (`noise` an int, or on CUDA a
    one-element integer tensor; `normal_noise_like` gives the same eps). Keeps x and u = a + eps for the
    backward, which computes relu(E1(x)) again; with `redraw` (and a seed) only x: the backward computes u again
    too. x contiguous or channels-last, out and the gradient in x's layout; s (1, C, 1, 1)."""

    @staticmethod
    def forward(ctx, x, noise: torch.Tensor | int, redraw: bool, s, *weights_strength_clip) -> torch.Tensor:
        *weights, strength, clip = weights_strength_clip  # w1_self, w1_mean, w2_self, w2_mean
        given = isinstance(noise, torch.Tensor) and noise.is_floating_point()
        eps, seed = (noise, None) if given else (None, noise)
        redraw = redraw and seed is not None
        out, u = device_kernels(x).perturb_forward(
            x, eps, seed, s.reshape(-1), *weights, *NO_TABLE, strength, clip, not redraw
        )
        ctx.save_for_backward(x, s, u, *weights)  # u: None where redrawn
        ctx.strength, ctx.clip, ctx.seed = strength, clip, seed if redraw else None
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, s, u, *weights = ctx.saved_tensors
        grad = grad.contiguous(memory_format=layout(x))
        weight_grads = any(ctx.needs_input_grad[4:8])  # φ frozen (target training): no kernel gradients
        grad_x, grad_s, *grad_w = device_kernels(x).perturb_backward(
            grad, x, u, ctx.seed, s.reshape(-1), *weights, ctx.strength, ctx.clip, weight_grads
        )
        grads = [grad_x, None, None, grad_s.view_as(s), *grad_w]
        return *(g if need else None for g, need in zip(grads, ctx.needs_input_grad, strict=False)), None, None


def expected_perturbation(
    x: torch.Tensor, s: torch.Tensor, weights: list[torch.Tensor], table: tuple, strength: float, clip: float
) -> torch.Tensor:
    """φ's deterministic single pass, z = E[softplus(a + eps)] interpolated in `table` (start, rise, grid limit,
    grid step), without gradients."""
    with torch.profiler.record_function(EXPECTED_PERTURBATION):
        out, _ = device_kernels(x).perturb_forward(
            x, None, None, s.reshape(-1), *weights, *table, strength, clip, False
        )
    return out


def draw_seed(x: torch.Tensor, fused: bool) -> int | torch.Tensor:
    """A seed for eps from torch's generator: for the CUDA kernels a one-element tensor drawn on the GPU (so that
    a CUDA graph draws a new one at each replay), else an int from the CPU's generator."""
    if fused and x.is_cuda:
        return torch.randint(2**62, (1,), device=x.device)
    return int(torch.randint(2**62, ()).item())


def normal_noise_like(x: torch.Tensor, seed: int | torch.Tensor) -> torch.Tensor:
    """The eps ~ N(0, 1) that the fused kernels draw from `seed` for a map shaped like x: counter-based
    generators (the C++ kernels' own, Philox on CUDA), so each value depends only on the seed, the image and the
    position."""
    return device_kernels(x).normal_noise_like(x, seed)


class FusedScaleFeatures(torch.autograd.Function):
    """f = GAP(relu(K * x)) of shape (B, C, h_dim) on the fused kernels. Where a gradient is wanted the C++ kernels
    keep relu's gates from the forward (a bit per value and kernel) for the backward; the Triton kernels find them
    again there."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
        f, gates = device_kernels(x).scale_features_forward(x, kernels, any(ctx.needs_input_grad))
        ctx.save_for_backward(x, kernels, gates)
        return f

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, kernels, gates = ctx.saved_tensors  # the gradient to x comes in x's layout
        grad_x, grad_kernels = device_kernels(x).scale_features_backward(
            grad, x, gates, kernels, ctx.needs_input_grad[1]
        )
        return grad_x if ctx.needs_input_grad[0] else None, grad_kernels
