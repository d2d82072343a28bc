"""φ's fused CPU kernels (`csrc/phi_cpu.cpp`): the noise path, the modulation and the scale features in a few
passes over each image while it sits in cache, instead of a dozen separate operators per injection site.

Built with the machine's C++ compiler the first time φ runs on a CPU (about 40 s, then cached by
torch.utils.cpp_extension). Where they cannot be built (no compiler), or with TIMM_METAPERTURB_CPU_KERNELS=0,
φ runs on torch operators instead: the same function, slower.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("csrc") / "phi_cpu.cpp"
# vectorised for this machine's CPU; no -ffast-math, which would break NaN propagation
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
ENV_SWITCH = "TIMM_METAPERTURB_CPU_KERNELS"
EXPECTED_PERTURBATION = "phi_cpu.expected_perturbation"  # the single pass's name in profiles

logger = logging.getLogger(__name__)
_is_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling  # the latter: torch < 2.3
_loaded: dict[str, ModuleType | None] = {}


def _build_name() -> str:
    """One build per CPU kind (-march=native code must not run on another CPU sharing the cache)."""
    cpu = platform.processor() or platform.machine()
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return "timm_metaperturb_phi_cpu_" + hashlib.sha1(f"{cpu}{flags}".encode()).hexdigest()[:10]


def cpu_kernels() -> ModuleType | None:
    """The compiled kernels, built on first call; None where switched off or where they cannot be built."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    if "kernels" not in _loaded:
        from torch.utils import cpp_extension

        logger.info("loading φ's fused CPU kernels (the first time on a machine this builds them, about 40 s)")
        try:
            _loaded["kernels"] = cpp_extension.load(
                _build_name(), [str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"]
            )
        except Exception as error:  # no compiler, no ninja, a failed build: φ still works, only slower
            warnings.warn(
                f"φ's fused CPU kernels could not be built ({type(error).__name__}: {error}); φ runs on torch "
                f"operators instead (same results, 2-4x slower). Install a C++ compiler and ninja, or set "
                f"{ENV_SWITCH}=0 to skip this attempt.",
                stacklevel=2,
            )
            _loaded["kernels"] = None
    return _loaded["kernels"]


def layout(x: torch.Tensor) -> torch.memory_format:
    """The layout the kernels read x in without a copy: channels-last where x is, else contiguous."""
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def usable(x: torch.Tensor) -> bool:
    """Whether φ can run on the fused kernels for the float32 map x: on a CPU, outside torch.compile (which
    traces torch operators), with the kernels built."""
    return x.device.type == "cpu" and not _is_compiling() and cpu_kernels() is not None


_NO_TABLE = (torch.empty(0), torch.empty(0), 0.0, 1.0)  # the expected-softplus table, unused when sampling


class FusedPerturbation(torch.autograd.Function):
    """out = min(((s * softplus(E2(relu(E1(x))) + eps) - 1) * k + 1) * x, clip) on the fused kernels, eps given
    (`noise`, in x's layout) or, for an int `noise`, drawn inside the kernel from that seed (`normal_noise_like`
    gives the same eps). Keeps x and u = a + eps for the backward, which computes relu(E1(x)) again; with
    `redraw` (and a seed) only x: the backward computes u again too. x contiguous or channels-last, out and the
    gradient in x's layout; s (1, C, 1, 1)."""

    @staticmethod
    def forward(ctx, x, noise: torch.Tensor | int, redraw: bool, s, *weights_strength_clip) -> torch.Tensor:
        *weights, strength, clip = weights_strength_clip  # w1_self, w1_mean, w2_self, w2_mean
        eps, seed = (None, noise) if isinstance(noise, int) else (noise, None)
        redraw = redraw and seed is not None
        out, u = cpu_kernels().perturb_forward(
            x, eps, seed, s.reshape(-1), *weights, *_NO_TABLE, strength, clip, not redraw
        )
        ctx.save_for_backward(x, s, u, *weights)  # u: None where redrawn
        ctx.strength, ctx.clip, ctx.seed = strength, clip, seed if redraw else None
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, s, u, *weights = ctx.saved_tensors
        grad = grad.contiguous(memory_format=layout(x))
        grad_x, grad_s, *grad_w = cpu_kernels().perturb_backward(
            grad, x, u, ctx.seed, s.reshape(-1), *weights, ctx.strength, ctx.clip
        )
        grads = [grad_x, None, None, grad_s.view_as(s), *grad_w]
        return *(g if need else None for g, need in zip(grads, ctx.needs_input_grad, strict=False)), None, None


def expected_perturbation(
    x: torch.Tensor, s: torch.Tensor, weights: list[torch.Tensor], table: tuple, strength: float, clip: float
) -> torch.Tensor:
    """φ's deterministic single pass, z = E[softplus(a + eps)] interpolated in `table` (start, rise, grid limit,
    grid step), without gradients."""
    with torch.profiler.record_function(EXPECTED_PERTURBATION):
        out, _ = cpu_kernels().perturb_forward(x, None, None, s.reshape(-1), *weights, *table, strength, clip, False)
    return out


def normal_noise_like(x: torch.Tensor, seed: int) -> torch.Tensor:
    """The eps ~ N(0, 1) that the fused kernels draw from `seed` for a map shaped like x (channels-last): a
    counter-based generator, so each value depends only on the seed, the image and the position."""
    return cpu_kernels().normal_noise_like(x, seed)


class FusedScaleFeatures(torch.autograd.Function):
    """f = GAP(relu(K * x)) of shape (B, C, h_dim) on the fused kernels; the backward computes K * x again."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, kernels)
        return cpu_kernels().scale_features_forward(x, kernels)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, kernels = ctx.saved_tensors  # the gradient to x comes in x's layout
        grad_x, grad_kernels = cpu_kernels().scale_features_backward(grad, x, kernels)
        return grad_x if ctx.needs_input_grad[0] else None, grad_kernels if ctx.needs_input_grad[1] else None
