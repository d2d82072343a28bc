"""φ's fused kernels as torch operators, for both devices: the C++ kernels on a CPU (`cpu.py`), the Triton
kernels on a CUDA GPU (`cuda.py`). Both take the same arguments, so one set of operators serves both.

Each is a `torch.library` custom operator with its shapes (a fake implementation) and its gradient registered, so
that autograd runs them, and torch.compile keeps them in its graph as they are instead of tracing into them
(which it cannot: their inside is C++ or Triton).

Where a device's kernels cannot run (no C++ compiler, no Triton), or with TIMM_METAPERTURB_CPU_KERNELS=0 /
TIMM_METAPERTURB_CUDA_KERNELS=0, φ runs on torch operators instead: the same function, slower.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

import torch
from torch import Tensor

from .cpu import cpu_kernels

CUDA_SWITCH = "TIMM_METAPERTURB_CUDA_KERNELS"
_cuda: dict[str, ModuleType | None] = {}


def cuda_kernels() -> ModuleType | None:
    """The Triton kernels; None where switched off or where Triton is missing (warned once)."""
    if os.environ.get(CUDA_SWITCH, "1") == "0":
        return None
    if "kernels" not in _cuda:
        try:
            from . import cuda

            _cuda["kernels"] = cuda
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


@torch.compiler.assume_constant_result  # torch.compile asks once, outside its trace (loading logs, may build)
def kernels_load(device_type: str) -> bool:
    """Whether the fused kernels for this kind of device load."""
    return device_kernels(torch.empty(0, device=device_type)) is not None


def layout(x: torch.Tensor) -> torch.memory_format:
    """The layout the kernels read x in without a copy: channels-last where x is, else contiguous."""
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def usable(x: torch.Tensor) -> bool:
    """Whether φ can run on the fused kernels for the float32 map x: on a device with kernels that load, and on
    CUDA for maps the Triton kernels' 32-bit indices reach."""
    if x.is_cuda and x.numel() >= 2**31:
        return False
    return kernels_load(x.device.type)


NO_TABLE = (torch.empty(0), torch.empty(0), 0.0, 1.0)  # the expected-softplus table, unused when sampling
OPS = "timm_metaperturb"  # φ's operators in torch.library, named so in profiles too ("timm_metaperturb::perturb")
EXPECTED_PERTURBATION = f"{OPS}::expected_perturbation"


def _or_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """An output the kernels leave out (None) as an empty tensor: a torch.library operator returns tensors."""
    return like.new_empty(0) if t is None else t


def _seed_value(seed: torch.Tensor | None) -> int | torch.Tensor | None:
    """The seed as the kernels take it: an int on a CPU, the one-element tensor itself on CUDA."""
    return None if seed is None else seed if seed.is_cuda else int(seed)


# -- the sampled noise path and modulation, and its gradients --------------------------------------------------


@torch.library.custom_op(f"{OPS}::perturb", mutates_args=())
def perturb(
    x: Tensor, eps: Tensor | None, seed: Tensor | None, s: Tensor, w1_self: Tensor, w1_mean: Tensor,
    w2_self: Tensor, w2_mean: Tensor, strength: float, clip: float, keep_u: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(out, u): out = min(((s * softplus(u) - 1) * k + 1) * x, clip), u = E2(relu(E1(x))) + eps, eps given or
    drawn inside the kernel from `seed` (a one-element integer tensor on x's device; `normal_noise_like` gives the
    same eps); u (else empty) where `keep_u`, for the backward, which otherwise draws eps again. x contiguous or
    channels-last, out in x's layout; s (C,)."""
    out, u = device_kernels(x).perturb_forward(
        x, eps, _seed_value(seed), s, w1_self, w1_mean, w2_self, w2_mean, *NO_TABLE, strength, clip, keep_u
    )
    return out, _or_empty(u, x)


@perturb.register_fake
def _(x, eps, seed, s, w1_self, w1_mean, w2_self, w2_mean, strength, clip, keep_u):
    u_layout = layout(x) if x.is_cuda else torch.channels_last  # the C++ kernels keep u channels-last
    return torch.empty_like(x, memory_format=layout(x)), (
        torch.empty_like(x, memory_format=u_layout) if keep_u else x.new_empty(0)
    )


@torch.library.custom_op(f"{OPS}::perturb_backward", mutates_args=())
def perturb_backward(
    grad: Tensor, x: Tensor, u: Tensor | None, seed: Tensor | None, s: Tensor, w1_self: Tensor, w1_mean: Tensor,
    w2_self: Tensor, w2_mean: Tensor, strength: float, clip: float, weight_grads: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(grad_x, grad_s, and the gradients to w1_self, w1_mean, w2_self, w2_mean, empty without `weight_grads`) of
    `perturb`, from u kept or drawn again from `seed`; grad in x's layout."""
    grad_x, grad_s, *grad_w = device_kernels(x).perturb_backward(
        grad, x, u, _seed_value(seed), s, w1_self, w1_mean, w2_self, w2_mean, strength, clip, weight_grads
    )  # the kernels' gradients are views of one tensor, which an operator's outputs must not be: copied (36 values)
    return grad_x, grad_s, *(x.new_empty(0) if g is None else g.clone() for g in grad_w)


@perturb_backward.register_fake
def _(grad, x, u, seed, s, w1_self, w1_mean, w2_self, w2_mean, strength, clip, weight_grads):
    weight_grad = (lambda w: torch.empty_like(w)) if weight_grads else (lambda w: x.new_empty(0))
    return (
        torch.empty_like(x, memory_format=layout(x)),
        s.new_empty(s.shape),
        *(weight_grad(w) for w in (w1_self, w1_mean, w2_self, w2_mean)),
    )


def _perturb_setup(ctx, inputs, output) -> None:
    x, _eps, seed, s, *weights, strength, clip, keep_u = inputs
    u = output[1] if keep_u else None
    ctx.save_for_backward(x, s, u, None if keep_u else seed, *weights)
    ctx.strength, ctx.clip = strength, clip


def _perturb_grads(ctx, grad: Tensor, _grad_u: Tensor) -> tuple[Tensor | None, ...]:
    x, s, u, seed, *weights = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_x, grad_s, *grad_w = perturb_backward(
        grad.contiguous(memory_format=layout(x)), x, u, seed, s, *weights, ctx.strength, ctx.clip, any(need[4:8])
    )  # φ frozen (target training): no kernel gradients
    grads = (grad_x, None, None, grad_s, *grad_w)
    return *(g if needed else None for g, needed in zip(grads, need, strict=False)), None, None, None


perturb.register_autograd(_perturb_grads, setup_context=_perturb_setup)


# -- the deterministic single pass -----------------------------------------------------------------------------


@torch.library.custom_op(f"{OPS}::expected_perturbation", mutates_args=())
def expected_perturbation(
    x: Tensor, s: Tensor, w1_self: Tensor, w1_mean: Tensor, w2_self: Tensor, w2_mean: Tensor, start: Tensor,
    rise: Tensor, grid_limit: float, grid_step: float, strength: float, clip: float,
) -> Tensor:  # fmt: skip
    """φ's single pass, z = E[softplus(a + eps)] interpolated in the table (start, rise, grid limit, grid step); no
    gradients (the pass is for evaluation)."""
    weights_table = (w1_self, w1_mean, w2_self, w2_mean, start, rise, grid_limit, grid_step)
    out, _ = device_kernels(x).perturb_forward(x, None, None, s, *weights_table, strength, clip, False)
    return out


@expected_perturbation.register_fake
def _(x, s, w1_self, w1_mean, w2_self, w2_mean, start, rise, grid_limit, grid_step, strength, clip):
    return torch.empty_like(x, memory_format=layout(x))


# -- the scale's features and their gradients ------------------------------------------------------------------


@torch.library.custom_op(f"{OPS}::scale_features", mutates_args=())
def scale_features(x: Tensor, kernels: Tensor, keep_gates: bool) -> tuple[Tensor, Tensor]:
    """(f, gates): f = GAP(relu(K * x)) of shape (B, C, h_dim); where `keep_gates`, the C++ kernels also return
    relu's gates (a bit per value and kernel) for the backward, the Triton kernels nothing (found again there)."""
    f, gates = device_kernels(x).scale_features_forward(x, kernels, keep_gates)
    return f.contiguous(), _or_empty(gates, x)


@scale_features.register_fake
def _(x, kernels, keep_gates):
    batch, channels, height, width = x.shape
    f = x.new_empty(batch, channels, kernels.shape[0])
    if not keep_gates or x.is_cuda:
        return f, x.new_empty(0)
    words = (width * channels + 15) // 16  # 16 gates to a word along each channels-last row (phi_cpu.cpp)
    return f, x.new_empty(batch, kernels.shape[0], height, words, dtype=torch.int16)


@torch.library.custom_op(f"{OPS}::scale_features_backward", mutates_args=())
def scale_features_backward(
    grad_f: Tensor, x: Tensor, gates: Tensor | None, kernels: Tensor, kernel_grads: bool
) -> tuple[Tensor, Tensor]:
    """(grad_x in x's layout, grad_kernels, empty without `kernel_grads`) of `scale_features`."""
    grad_x, grad_kernels = device_kernels(x).scale_features_backward(grad_f, x, gates, kernels, kernel_grads)
    return grad_x, _or_empty(grad_kernels, x)


@scale_features_backward.register_fake
def _(grad_f, x, gates, kernels, kernel_grads):
    return torch.empty_like(x, memory_format=layout(x)), torch.empty_like(kernels) if kernel_grads else x.new_empty(0)


def _scale_features_setup(ctx, inputs, output) -> None:
    x, kernels, keep_gates = inputs
    ctx.save_for_backward(x, kernels, output[1] if keep_gates and not x.is_cuda else None)


def _scale_features_grads(ctx, grad: Tensor, _grad_gates: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
    x, kernels, gates = ctx.saved_tensors
    grad_x, grad_kernels = scale_features_backward(grad, x, gates, kernels, ctx.needs_input_grad[1])
    return grad_x if ctx.needs_input_grad[0] else None, grad_kernels if ctx.needs_input_grad[1] else None, None


scale_features.register_autograd(_scale_features_grads, setup_context=_scale_features_setup)


def draw_seed(x: Tensor, fused: bool) -> int | Tensor:
    """A seed for eps from torch's generator: for the fused kernels a one-element tensor on x's device (drawn in a
    compiled graph too, and on the GPU so that a CUDA graph draws a new one at each replay), else an int."""
    if fused:
        return torch.randint(2**62, (1,), device=x.device)
    return int(torch.randint(2**62, ()).item())


def normal_noise_like(x: torch.Tensor, seed: int | torch.Tensor) -> torch.Tensor:
    """The eps ~ N(0, 1) that the fused kernels draw from `seed` for a map shaped like x: counter-based
    generators (the C++ kernels' own, Philox on CUDA), so each value depends only on the seed, the image and the
    position."""
    return device_kernels(x).normal_noise_like(x, _seed_value(torch.as_tensor(seed)))
