"""φ on torch operators: the formulas of `module.py` as autograd functions that save little memory, plus
E[softplus(a + eps)] by table for the deterministic pass. Runs on any device; `fused.py` replaces it with compiled
kernels where they load (same results)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def shared_depthwise_conv(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Apply one (1, 1, k, k) kernel to every channel of x (B, C, H, W): a depthwise convolution.

    Run on a channels-last x, oneDNN's depthwise kernel is about 15x faster on CPU than on NCHW or than one
    convolution with several kernels per channel, so φ calls this once per kernel on a channels-last copy.
    """
    return F.conv2d(x, kernel.expand(x.shape[1], -1, -1, -1), padding=kernel.shape[-1] // 2, groups=x.shape[1])


def _shared_depthwise_backward(
    grad: torch.Tensor, x: torch.Tensor, kernel: torch.Tensor, need_x: bool, need_kernel: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of `shared_depthwise_conv(x, kernel)` to x and to the one (1, 1, k, k) kernel."""
    channels, pad = x.shape[1], kernel.shape[-1] // 2
    weight = kernel.expand(channels, -1, -1, -1).contiguous()
    gx, gw, _ = torch.ops.aten.convolution_backward(
        grad, x, weight, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], channels, [need_x, need_kernel, False]
    )
    return gx, gw.sum(0, keepdim=True) if gw is not None else None


class ScaleFeatures(torch.autograd.Function):
    """f[b, c, i] = mean over H, W of relu(K_i * x)[b, c] for every shared kernel K_i.

    Backward recomputes each convolution rather than storing h_dim feature maps: the recomputation costs one
    cheap depthwise forward per kernel, storing would double the memory φ adds to a training step.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, kernels)
        return torch.stack([F.relu_(shared_depthwise_conv(x, kernel[None])).mean((2, 3)) for kernel in kernels], -1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, kernels = ctx.saved_tensors
        grad = grad / (x.shape[2] * x.shape[3])
        grad_x, grad_kernels = None, []
        for i, kernel in enumerate(kernels):
            active = shared_depthwise_conv(x, kernel[None]).gt_(0.0)  # relu's derivative, as 0/1
            gx, gk = _shared_depthwise_backward(
                active.mul_(grad[:, :, i, None, None]), x, kernel[None], *ctx.needs_input_grad
            )
            if gx is not None:
                grad_x = gx if grad_x is None else grad_x.add_(gx)
            if gk is not None:
                grad_kernels.append(gk[0])
        return grad_x, torch.stack(grad_kernels) if grad_kernels else None


def equivariant(x: torch.Tensor, weight_self: torch.Tensor, weight_mean: torch.Tensor) -> torch.Tensor:
    """The channel-permutation-equivariant 3x3 layer: a self kernel per channel plus a kernel on the mean."""
    pad = weight_self.shape[-1] // 2
    return shared_depthwise_conv(x, weight_self).add_(F.conv2d(x.mean(1, keepdim=True), weight_mean, padding=pad))


def _equivariant_backward(
    grad: torch.Tensor, x: torch.Tensor, weight_self: torch.Tensor, weight_mean: torch.Tensor, needs: tuple[bool, ...]
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of `equivariant` to x, weight_self and weight_mean (each only where `needs` says)."""
    gx, gw = _shared_depthwise_backward(grad, x, weight_self, needs[0], needs[1])
    mean, grad_mean = x.mean(1, keepdim=True), grad.sum(1, keepdim=True)
    gm, gwm = _shared_depthwise_backward(grad_mean, mean, weight_mean, needs[0], needs[2])  # one channel: a plain conv
    if gx is not None:
        gx.add_(gm / x.shape[1])
    return gx, gw, gwm


def draw_noise(seed: int, like: torch.Tensor) -> torch.Tensor:
    """eps ~ N(0, 1) of like's shape, channels-last, from its own generator seeded with `seed`: the backward can
    draw the same eps again instead of storing it. Drawn as (B, H, W, C): randn_like on a channels-last map is 10x
    slower on CPU."""
    generator = torch.Generator(like.device).manual_seed(seed)
    b, c, h, w = like.shape
    return torch.randn(b, h, w, c, generator=generator, device=like.device).permute(0, 3, 1, 2)


class SampledPerturbation(torch.autograd.Function):
    """φ's noise path and modulation in one: out = min(m * x, clip), m = (s * softplus(u) - 1) * k + 1,
    u = E2(relu(E1(x))) + eps, with the gradient written out.

    Autograd would keep seven full-size intermediates; this keeps x and either u or, where drawing eps again is
    cheap (`redraw`, only with eps given by its seed), nothing more: the backward recomputes E1's output (and
    then u) from x, one or two cheap layers against a feature map's worth of memory per site. Channels-last.
    """

    @staticmethod
    def forward(ctx, x, noise: torch.Tensor | int, redraw: bool, s, w1_self, w1_mean, w2_self, w2_mean,
                strength: float, clip: float) -> torch.Tensor:  # fmt: skip
        eps = draw_noise(noise, x) if isinstance(noise, int) else noise
        u = equivariant(F.relu_(equivariant(x, w1_self, w1_mean)), w2_self, w2_mean).add_(eps)
        ctx.save_for_backward(x, s, w1_self, w1_mean, w2_self, w2_mean, *([] if redraw else [u]))
        ctx.strength, ctx.clip, ctx.seed = strength, clip, noise if redraw else None
        return modulate(x, F.softplus(u), s, strength, clip, in_place=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, s, w1_self, w1_mean, w2_self, w2_mean, *kept = ctx.saved_tensors
        need_x, _, _, need_s, *need_w = ctx.needs_input_grad[:8]
        k, grad = ctx.strength, grad.contiguous(memory_format=torch.channels_last)
        r = F.relu_(equivariant(x, w1_self, w1_mean))
        u = kept[0] if kept else equivariant(r, w2_self, w2_mean).add_(draw_noise(ctx.seed, x))
        z = F.softplus(u)
        m = z * (s * k) + (1.0 - k)
        grad = torch.ops.aten.threshold_backward(grad, torch.rsub(m * x, ctx.clip), 0.0)  # 0 where clipped
        grad_mx = grad * x
        grad_s = (grad_mx * z).sum((0, 2, 3), keepdim=True) * k if need_s else None
        grad_x = grad.mul_(m) if need_x else None
        grad_w: list[torch.Tensor | None] = [None] * 4
        if need_x or any(need_w):
            grad_u = grad_mx.mul_(s * k).mul_(torch.sigmoid(u))
            grad_r, grad_w[2], grad_w[3] = _equivariant_backward(grad_u, r, w2_self, w2_mean, (True, *need_w[2:]))
            grad_pre = torch.ops.aten.threshold_backward(grad_r, r, 0.0)
            gx, grad_w[0], grad_w[1] = _equivariant_backward(grad_pre, x, w1_self, w1_mean, (need_x, *need_w[:2]))
            grad_x = grad_x.add_(gx) if need_x else None
        return grad_x, None, None, grad_s, *grad_w, None, None


def modulate(
    h: torch.Tensor, z: torch.Tensor, s: torch.Tensor, strength: float, clip: float, in_place: bool
) -> torch.Tensor:
    """min(((s * z - 1) * k + 1) * h, clip); in place in z's storage when z is not needed afterwards."""
    m = z.mul_(s * strength) if in_place else z * (s * strength)
    return m.add_(1.0 - strength).mul_(h).clamp_(max=clip)


def layout_of(x: torch.Tensor) -> torch.memory_format:
    is_channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if is_channels_last else torch.contiguous_format


class _Relayout(torch.autograd.Function):
    """x in another memory layout, its gradient returned in x's layout: the network keeps its own layout in
    forward and backward while φ computes channels-last (operations on mixed layouts are slow)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
        ctx.layout = layout_of(x)
        return x.contiguous(memory_format=layout)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.contiguous(memory_format=ctx.layout), None


def relayout(x: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
    return x if x.is_contiguous(memory_format=layout) else _Relayout.apply(x, layout)


GRID_LIMIT, GRID_STEP = 16.0, 1.0 / 256


def _expected_softplus_grid() -> tuple[torch.Tensor, torch.Tensor]:
    """E[softplus(a + eps)], eps ~ N(0, 1), on a grid of a in [-16, 16] (step 1/256), by 96-node Gauss-Hermite
    quadrature in float64 (E[f(a + eps)] = sum_i w_i f(a + sqrt(2) x_i) / sqrt(pi)): each interval's start
    value and rise. Computed once at import, outside any torch.compile trace (numpy cannot be traced)."""
    nodes, weights = np.polynomial.hermite.hermgauss(96)
    grid = np.arange(-GRID_LIMIT, GRID_LIMIT + GRID_STEP / 2, GRID_STEP)
    values = np.logaddexp(0.0, grid[:, None] + np.sqrt(2.0) * nodes[None, :]) @ weights / np.sqrt(np.pi)
    return torch.from_numpy(values[:-1]), torch.from_numpy(np.diff(values))


_EXPECTED_SOFTPLUS_GRID = _expected_softplus_grid()
_expected_softplus_tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def expected_softplus_table(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid on `device` in `dtype`, copied there once (a dict, not functools.cache: torch.compile warns on
    every trace through a cache wrapper). Not kept while exporting, whose tensors are stand-ins without values."""
    key = (device, dtype)
    if torch.compiler.is_exporting() or torch.jit.is_tracing():
        return tuple(t.to(device=device, dtype=dtype) for t in _EXPECTED_SOFTPLUS_GRID)
    if key not in _expected_softplus_tables:
        _expected_softplus_tables[key] = tuple(t.to(device=device, dtype=dtype) for t in _EXPECTED_SOFTPLUS_GRID)
    return _expected_softplus_tables[key]


def expected_softplus(a: torch.Tensor) -> torch.Tensor:
    """E[softplus(a + eps)] with eps ~ N(0, 1), to about 1e-6: the noise replaced by its expectation, for a
    deterministic single-pass evaluation. Linear interpolation in a table precomputed on [-16, 16], continued
    as a constant below (where the function is below 2e-7) and along its last interval above (slope 1 to 2e-7).
    Two gathers and a few elementwise operations: cheaper than a softplus per quadrature node."""
    start, rise = expected_softplus_table(a.device, a.dtype)
    position = a.mul(1.0 / GRID_STEP).add_(GRID_LIMIT / GRID_STEP).clamp_(min=0.0)
    index = position.nan_to_num(0.0).clamp_(max=len(start) - 1).long()  # a NaN reads entry 0 and stays NaN in z
    return torch.take(start, index).addcmul_(position - index, torch.take(rise, index))


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """Depthwise convolutions run fastest on channels-last maps (oneDNN on CPU, cuDNN on GPU)."""
    return relayout(x, torch.channels_last)
