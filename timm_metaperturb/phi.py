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

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .hub import PhiHubMixin


def shared_depthwise_conv(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Apply the same (K, 1, k, k) kernels to every channel of x (B, C, H, W): a depthwise convolution whose
    output (B, C * K, H, W) holds channel c's K maps at c * K ... c * K + K - 1."""
    channels = x.shape[1]
    return F.conv2d(x, kernels.repeat(channels, 1, 1, 1), padding=kernels.shape[-1] // 2, groups=channels)


EVAL_NOISE = ("sample", "mean")
_GRID_LIMIT, _GRID_STEP = 12.0, 1.0 / 256


@functools.cache
def _expected_softplus_table() -> torch.Tensor:
    """E[softplus(a + eps)], eps ~ N(0, 1), on a grid of a in [-12, 12] (step 1/256), by 96-node Gauss-Hermite
    quadrature in float64: E[f(a + eps)] = sum_i w_i f(a + sqrt(2) x_i) / sqrt(pi)."""
    nodes, weights = np.polynomial.hermite.hermgauss(96)
    grid = np.arange(-_GRID_LIMIT, _GRID_LIMIT + _GRID_STEP / 2, _GRID_STEP)
    values = np.logaddexp(0.0, grid[:, None] + np.sqrt(2.0) * nodes[None, :]) @ weights / np.sqrt(np.pi)
    return torch.from_numpy(values)


def expected_softplus(a: torch.Tensor) -> torch.Tensor:
    """E[softplus(a + eps)] with eps ~ N(0, 1), to about 1e-6: the noise replaced by its expectation, for a
    deterministic single-pass evaluation. Linear interpolation in a precomputed table inside [-12, 12]; outside,
    the asymptotes a + exp(0.5 - a) and exp(a + 0.5) (errors below 1e-10)."""
    table = _expected_softplus_table().to(device=a.device, dtype=a.dtype)
    position = (a.clamp(-_GRID_LIMIT, _GRID_LIMIT) + _GRID_LIMIT) / _GRID_STEP
    index = position.floor().long().clamp(max=len(table) - 2)
    inside = torch.lerp(table[index], table[index + 1], position - index)
    outside = torch.where(a > 0, a + torch.exp(0.5 - a), torch.exp(a + 0.5))
    return torch.where(a.abs() > _GRID_LIMIT, outside, inside)


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
        weight_self, weight_mean = self.weight_self.float(), self.weight_mean.float()
        pad = weight_self.shape[-1] // 2
        return shared_depthwise_conv(x, weight_self) + F.conv2d(x.mean(1, keepdim=True), weight_mean, padding=pad)


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

    # -- the two halves of φ ---------------------------------------------------------------------------

    def noise_logits(self, h: torch.Tensor) -> torch.Tensor:
        """a = E2(relu(E1(h))): the pre-softplus mean of the multiplicative noise, same shape as h."""
        return self.noise2(F.relu(self.noise1(h)))

    def scale_features(self, h: torch.Tensor) -> torch.Tensor:
        """f = GAP(relu(K * h)) of shape (B, C, h_dim): what the scale's statistics summarise."""
        f = F.relu(shared_depthwise_conv(h, self.scale_kernels.float())).mean((-2, -1))
        return f.view(h.shape[0], h.shape[1], self.h_dim)

    def scale(self, mean: torch.Tensor, var: torch.Tensor, height: int) -> torch.Tensor:
        """s in [0, 1]^C from the (C, h_dim) statistics, the channel count and the feature map height."""
        channels = mean.shape[0]
        sizes = mean.new_tensor([channels / self.channel_norm, height / self.spatial_norm]).expand(channels, 2)
        return torch.sigmoid(F.linear(torch.cat([mean, var, sizes], 1), self.scale_fc.weight.float())).squeeze(1)

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
            if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
                raise FloatingPointError(
                    f"MetaPerturb at site '{site}' received non-finite features (NaN or inf) in training; its "
                    "running statistics were left unchanged. Check the input data and the learning rate."
                )
            with torch.no_grad():
                stats.running_mean.lerp_(mean.detach().to(stats.running_mean.dtype), self.momentum)
                stats.running_var.lerp_(var.detach().to(stats.running_var.dtype), self.momentum)
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
            mean, var = self.channel_statistics(x, stats, site)
            s = self.scale(mean, var, x.shape[-2])
            a = self.noise_logits(x)
            if not self.training and self.eval_noise == "mean":
                z = expected_softplus(a)
            else:
                eps = torch.randn_like(a) if noise is None else noise.float()
                z = F.softplus(a + eps)
            m = (s.view(1, -1, 1, 1) * z - 1.0) * strength + 1.0
            out = torch.clamp(m * x, max=self.clip)
        return out.to(h.dtype)
