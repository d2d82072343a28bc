"""φ, the MetaPerturb perturbation function: 82 parameters shared by every block of a network.

For a feature map h of shape (B, C, H, W), φ returns clamp(m * h, max=clip) with

    m = (s * z - 1) * k + 1,
    z = softplus(a + eps), eps ~ N(0, 1)                 (input-dependent noise, per element)
    a = E2(relu(E1(h)))                                   (channel-permutation-equivariant set function)
    s = sigmoid(w · [mean_B(f), var_B(f), C/c_norm, H/s_norm]),  f = GAP(relu(K * h))   (per-channel scale)

where E1, E2 are 3x3 layers shared by all channels (a self kernel plus a kernel on the channel mean), K are
`h_dim` 3x3 kernels shared by all channels, and k in [0, 1] is the annealing strength. The batch statistics
of f are replaced by running estimates (one set per injection site, see `SiteStatistics`) at eval.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import phi_fused
from .hub import PhiHubMixin


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


class _ScaleFeatures(torch.autograd.Function):
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


def _equivariant(x: torch.Tensor, weight_self: torch.Tensor, weight_mean: torch.Tensor) -> torch.Tensor:
    """The channel-permutation-equivariant 3x3 layer: a self kernel per channel plus a kernel on the mean."""
    pad = weight_self.shape[-1] // 2
    return shared_depthwise_conv(x, weight_self).add_(F.conv2d(x.mean(1, keepdim=True), weight_mean, padding=pad))


def _equivariant_backward(
    grad: torch.Tensor, x: torch.Tensor, weight_self: torch.Tensor, weight_mean: torch.Tensor, needs: tuple[bool, ...]
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of `_equivariant` to x, weight_self and weight_mean (each only where `needs` says)."""
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


class _SampledPerturbation(torch.autograd.Function):
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
        u = _equivariant(F.relu_(_equivariant(x, w1_self, w1_mean)), w2_self, w2_mean).add_(eps)
        ctx.save_for_backward(x, s, w1_self, w1_mean, w2_self, w2_mean, *([] if redraw else [u]))
        ctx.strength, ctx.clip, ctx.seed = strength, clip, noise if redraw else None
        return _modulate(x, F.softplus(u), s, strength, clip, in_place=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, s, w1_self, w1_mean, w2_self, w2_mean, *kept = ctx.saved_tensors
        need_x, _, _, need_s, *need_w = ctx.needs_input_grad[:8]
        k, grad = ctx.strength, grad.contiguous(memory_format=torch.channels_last)
        r = F.relu_(_equivariant(x, w1_self, w1_mean))
        u = kept[0] if kept else _equivariant(r, w2_self, w2_mean).add_(draw_noise(ctx.seed, x))
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


def _modulate(
    h: torch.Tensor, z: torch.Tensor, s: torch.Tensor, strength: float, clip: float, in_place: bool
) -> torch.Tensor:
    """min(((s * z - 1) * k + 1) * h, clip); in place in z's storage when z is not needed afterwards."""
    m = z.mul_(s * strength) if in_place else z * (s * strength)
    return m.add_(1.0 - strength).mul_(h).clamp_(max=clip)


def _layout(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


class _Relayout(torch.autograd.Function):
    """x in another memory layout, its gradient returned in x's layout: the network keeps its own layout in
    forward and backward while φ computes channels-last (operations on mixed layouts are slow)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
        ctx.layout = _layout(x)
        return x.contiguous(memory_format=layout)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.contiguous(memory_format=ctx.layout), None


def _relayout(x: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
    return x if x.is_contiguous(memory_format=layout) else _Relayout.apply(x, layout)


EVAL_NOISE = ("sample", "mean")
COMPONENTS = ("noise", "scale")  # φ's two factors: the input-dependent noise z and the per-channel scale s
_GRID_LIMIT, _GRID_STEP = 16.0, 1.0 / 256


def _expected_softplus_grid() -> tuple[torch.Tensor, torch.Tensor]:
    """E[softplus(a + eps)], eps ~ N(0, 1), on a grid of a in [-16, 16] (step 1/256), by 96-node Gauss-Hermite
    quadrature in float64 (E[f(a + eps)] = sum_i w_i f(a + sqrt(2) x_i) / sqrt(pi)): each interval's start
    value and rise. Computed once at import, outside any torch.compile trace (numpy cannot be traced)."""
    nodes, weights = np.polynomial.hermite.hermgauss(96)
    grid = np.arange(-_GRID_LIMIT, _GRID_LIMIT + _GRID_STEP / 2, _GRID_STEP)
    values = np.logaddexp(0.0, grid[:, None] + np.sqrt(2.0) * nodes[None, :]) @ weights / np.sqrt(np.pi)
    return torch.from_numpy(values[:-1]), torch.from_numpy(np.diff(values))


_EXPECTED_SOFTPLUS_GRID = _expected_softplus_grid()
_expected_softplus_tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def _expected_softplus_table(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid on `device` in `dtype`, copied there once (a dict, not functools.cache: torch.compile warns on
    every trace through a cache wrapper)."""
    key = (device, dtype)
    if key not in _expected_softplus_tables:
        _expected_softplus_tables[key] = tuple(t.to(device=device, dtype=dtype) for t in _EXPECTED_SOFTPLUS_GRID)
    return _expected_softplus_tables[key]


def expected_softplus(a: torch.Tensor) -> torch.Tensor:
    """E[softplus(a + eps)] with eps ~ N(0, 1), to about 1e-6: the noise replaced by its expectation, for a
    deterministic single-pass evaluation. Linear interpolation in a table precomputed on [-16, 16], continued
    as a constant below (where the function is below 2e-7) and along its last interval above (slope 1 to 2e-7).
    Two gathers and a few elementwise operations: cheaper than a softplus per quadrature node."""
    start, rise = _expected_softplus_table(a.device, a.dtype)
    position = a.mul(1.0 / _GRID_STEP).add_(_GRID_LIMIT / _GRID_STEP).clamp_(min=0.0)
    index = position.nan_to_num(0.0).clamp_(max=len(start) - 1).long()  # a NaN reads entry 0 and stays NaN in z
    return torch.take(start, index).addcmul_(position - index, torch.take(rise, index))


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """Depthwise convolutions run fastest on channels-last maps (oneDNN on CPU, cuDNN on GPU)."""
    return _relayout(x, torch.channels_last)


class EquivariantConv2d(nn.Module):
    """A channel-permutation-equivariant 3x3 layer: a self kernel per channel plus a kernel on the channel mean.

    Both kernels are shared by every channel, so the layer works for any channel count and permuting the
    input channels permutes the output channels the same way.
    """

    def __init__(self, kernel_size: int = 3) -> None:
        super().__init__()
        self.weight_self = nn.Parameter(torch.empty(1, 1, kernel_size, kernel_size))
        self.weight_mean = nn.Parameter(torch.empty(1, 1, kernel_size, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _equivariant(x, self.weight_self.float(), self.weight_mean.float())


@torch.library.custom_op("timm_metaperturb::all_finite", mutates_args=())
def all_finite(mean: torch.Tensor, var: torch.Tensor, site: str) -> torch.Tensor:
    """Whether a batch's statistics are all finite (a bool on their device); if not, an error naming the site,
    except in a CUDA graph being captured, which cannot read the answer on the host. An operator, so that a
    compiled graph raises it too (torch.compile cannot trace a branch on a tensor's values)."""
    finite = torch.isfinite(mean).all() & torch.isfinite(var).all()
    if not (finite.is_cuda and torch.cuda.is_current_stream_capturing()) and not finite:
        raise FloatingPointError(
            f"MetaPerturb at site '{site}' received non-finite features (NaN or inf) in training; its running "
            "statistics were left unchanged. Check the input data and the learning rate."
        )
    return finite


@all_finite.register_fake
def _(mean, var, site):
    return mean.new_empty((), dtype=torch.bool)


class SiteStatistics(nn.Module):
    """Running estimates of φ's channel statistics at one injection site (like batch norm's buffers).

    Its `training` flag decides whether φ uses the batch's statistics (and updates these) or these estimates.
    """

    def __init__(self, channels: int, h_dim: int) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels, h_dim))
        self.register_buffer("running_var", torch.ones(channels, h_dim))

    @property
    def channels(self) -> int:
        return self.running_mean.shape[0]

    def extra_repr(self) -> str:
        return f"channels={self.channels}, h_dim={self.running_mean.shape[1]}"


class MetaPerturb(
    nn.Module,
    PhiHubMixin,
    library_name="timm-metaperturb",
    tags=["metaperturb", "timm", "regularization", "image-classification"],
    license="apache-2.0",
):
    """The perturbation function φ (Ryu et al., "MetaPerturb", NeurIPS 2020).

    Args:
        h_dim: number of shared kernels of the scaling function (4 in the paper).
        kernel_size: spatial size of every kernel (3 in the paper).
        clip: upper clamp of the perturbed feature map.
        channel_norm: c_norm, divides the channel count fed to the scaling function.
        spatial_norm: s_norm, divides the feature map height fed to the scaling function.
        momentum: momentum of the per-site running statistics (as in batch norm).
    """

    def __init__(
        self,
        h_dim: int = 4,
        kernel_size: int = 3,
        clip: float = 100.0,
        channel_norm: float = 64.0,
        spatial_norm: float = 32.0,
        momentum: float = 0.1,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd so that feature maps keep their size, got {kernel_size}")
        self.h_dim = h_dim
        self.kernel_size = kernel_size
        self.clip = float(clip)
        self.channel_norm = float(channel_norm)
        self.spatial_norm = float(spatial_norm)
        self.momentum = float(momentum)
        self.provenance: dict = {}  # how this φ was made: source data, network, steps, command, results
        self.eval_noise = "sample"  # at eval: "sample" eps (the reference) or use its expectation ("mean")
        # the backward draws eps again from its seed rather than keeping u, a feature map per site; None: where
        # drawing is cheap (the fused kernels, accelerators), not with torch operators on a CPU
        self.redraw_noise: bool | None = None
        # run on the fused kernels of phi_fused.py (C++ on a CPU, Triton on CUDA) where they load (False: torch
        # operators)
        self.fused_kernels = True
        self.components = COMPONENTS
        self.noise1 = EquivariantConv2d(kernel_size)
        self.noise2 = EquivariantConv2d(kernel_size)
        self.scale_kernels = nn.Parameter(torch.empty(h_dim, 1, kernel_size, kernel_size))
        self.scale_fc = nn.Linear(2 * h_dim + 2, 1, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's initialisation: every parameter ~ N(0, 0.01^2)."""
        for p in self.parameters():
            nn.init.normal_(p, std=0.01)

    @property
    def config(self) -> dict:
        """The constructor arguments: saved beside the weights, enough to rebuild φ."""
        return {
            "h_dim": self.h_dim,
            "kernel_size": self.kernel_size,
            "clip": self.clip,
            "channel_norm": self.channel_norm,
            "spatial_norm": self.spatial_norm,
            "momentum": self.momentum,
        }

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items())

    @property
    def components(self) -> tuple[str, ...]:
        """Which of φ's factors act: both (default); ("noise",) fixes s = 1, ("scale",) fixes z = 1 (ablations)."""
        return self._components

    @components.setter
    def components(self, value: tuple[str, ...] | list[str]) -> None:
        value = tuple(value)
        if not value or set(value) - set(COMPONENTS):
            raise ValueError(f"φ's components must be a non-empty subset of {COMPONENTS}, got {value}")
        self._components = value

    # -- the two halves of φ ---------------------------------------------------------------------------

    def noise_logits(self, h: torch.Tensor) -> torch.Tensor:
        """a = E2(relu(E1(h))): the pre-softplus mean of the multiplicative noise, same shape as h."""
        return self.noise2(F.relu(self.noise1(_channels_last(h))))

    def scale_features(self, h: torch.Tensor) -> torch.Tensor:
        """f = GAP(relu(K * h)) of shape (B, C, h_dim): what the scale's statistics summarise."""
        kernels = self.scale_kernels.float()
        if self._fused(h):
            keep_gates = torch.is_grad_enabled() and (h.requires_grad or kernels.requires_grad)
            return phi_fused.scale_features(h.contiguous(memory_format=phi_fused.layout(h)), kernels, keep_gates)[0]
        return _ScaleFeatures.apply(_channels_last(h), kernels)

    def _fused(self, x: torch.Tensor) -> bool:
        return self.fused_kernels and phi_fused.usable(x)

    def _noise_weights(self) -> list[torch.Tensor]:
        return [w.float() for layer in (self.noise1, self.noise2) for w in (layer.weight_self, layer.weight_mean)]

    def scale(self, mean: torch.Tensor, var: torch.Tensor, height: int) -> torch.Tensor:
        """s in [0, 1]^C from the (C, h_dim) statistics, the channel count and the feature map height."""
        weight = self.scale_fc.weight.float()[0]
        # the two size inputs as python numbers (no host-to-device copy, so a CUDA graph can capture φ)
        sizes = weight[-2] * (mean.shape[0] / self.channel_norm) + weight[-1] * (height / self.spatial_norm)
        return torch.sigmoid(F.linear(torch.cat([mean, var], 1), weight[None, :-2]).squeeze(1) + sizes)

    def channel_statistics(
        self, h: torch.Tensor, stats: SiteStatistics | None, site: str = "φ"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch mean and unbiased variance of f in training (updating `stats`), running estimates otherwise.

        A batch of one has no variance: in training it uses the running estimates (and leaves them as they
        are); without running estimates it is an error.
        """
        use_batch = stats is None or stats.training
        if use_batch and h.shape[0] == 1:
            if stats is None:
                raise ValueError(
                    "φ's scale needs a batch variance, which a batch of 1 does not have: pass SiteStatistics "
                    "(running estimates) or a batch of at least 2"
                )
            use_batch = False
        if not use_batch:
            return stats.running_mean.float(), stats.running_var.float()
        f = self.scale_features(h)
        mean, var = f.mean(0), f.var(0, unbiased=True)
        if stats is not None:
            with torch.no_grad():
                finite = all_finite(mean, var, site)  # else an error, or in a CUDA graph no update (on the device)
                for running, batch in ((stats.running_mean, mean), (stats.running_var, var)):
                    updated = running.lerp(batch.to(running.dtype), self.momentum)
                    running.copy_(torch.where(finite, updated, running))
        return mean, var

    def forward(
        self,
        h: torch.Tensor,
        stats: SiteStatistics | None = None,
        strength: float = 1.0,
        noise: torch.Tensor | None = None,
        site: str = "φ",
    ) -> torch.Tensor:
        """Perturb a (B, C, H, W) feature map; `noise` fixes eps (tests), `site` names the caller in errors.

        φ always computes in float32 (under autocast too) and returns h's dtype, so half-precision networks get
        a finite perturbation.
        """
        if h.dim() != 4:
            raise ValueError(f"MetaPerturb at site '{site}' needs a 4-D (B, C, H, W) feature map, got {tuple(h.shape)}")
        with torch.autocast(device_type=h.device.type, enabled=False):
            x = h.float()
            fused = self._fused(x)  # the fused kernels read either layout; torch operators run channels-last
            x = x.contiguous(memory_format=phi_fused.layout(x)) if fused else _channels_last(x)
            if "scale" in self.components:
                mean, var = self.channel_statistics(x, stats, site)
                s = self.scale(mean, var, x.shape[-2]).view(1, -1, 1, 1)
            else:
                s = x.new_ones(1, x.shape[1], 1, 1)
            if "noise" not in self.components:
                out = _modulate(x, x.new_ones(()).expand_as(x), s, strength, self.clip, in_place=False)
            elif not self.training and self.eval_noise == "mean":
                needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, s, *self.parameters()))
                if fused and not needs_grad:  # the fused single pass has no backward
                    table = (*_expected_softplus_table(x.device, x.dtype), _GRID_LIMIT, _GRID_STEP)
                    weights = self._noise_weights()
                    out = phi_fused.expected_perturbation(x, s.view(-1), *weights, *table, strength, self.clip)
                else:
                    x = _channels_last(x)
                    z = expected_softplus(self.noise_logits(x))
                    out = _modulate(x, z, s, strength, self.clip, in_place=not z.requires_grad)
            else:
                cheap_draw = fused or x.device.type != "cpu"
                redraw = noise is None and (cheap_draw if self.redraw_noise is None else self.redraw_noise)
                # eps given, or a seed drawn from torch's generator: the fused kernels draw eps from it, torch
                # operators too and again in the backward where `redraw`
                seed = phi_fused.draw_seed(x, fused) if noise is None else None
                weights = self._noise_weights()
                if fused:
                    eps = None if noise is None else noise.float().contiguous(memory_format=phi_fused.layout(x))
                    out, _ = phi_fused.perturb(x, eps, seed, s.view(-1), *weights, strength, self.clip, not redraw)
                else:  # x is channels-last already
                    eps = seed if noise is None else _relayout(noise.float(), torch.channels_last)
                    out = _SampledPerturbation.apply(x, eps, redraw, s, *weights, strength, self.clip)
        return _relayout(out, _layout(h)).to(h.dtype)
