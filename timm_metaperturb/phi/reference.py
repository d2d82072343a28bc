"""φ's formulas written out directly, every gradient left to autograd: the ground truth that the fast φ of
`module.py` is tested against (forward and gradients) and that `benchmarks/overhead.py` times it against.

The reference's way: depthwise convolutions with the shared kernels repeated per channel, one grouped
convolution with h_dim * C outputs for the scale statistics, separate elementwise operations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .module import MetaPerturb


def reference_perturb(
    phi: MetaPerturb,
    h: torch.Tensor,
    eps: torch.Tensor,
    mean_var: tuple[torch.Tensor, torch.Tensor] | None = None,
    strength: float = 1.0,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """φ(h) with noise eps; the scale from h's batch statistics, or from `mean_var` (running estimates) when
    given. Returns the perturbed map and the statistics used."""
    batch, channels, height, _ = h.shape
    pad = phi.kernel_size // 2

    def depthwise(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernels.repeat(channels, 1, 1, 1), padding=pad, groups=channels)

    def equivariant(x: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
        return depthwise(x, layer.weight_self) + F.conv2d(x.mean(1, keepdim=True), layer.weight_mean, padding=pad)

    a = equivariant(F.relu(equivariant(h, phi.noise1)), phi.noise2)
    z = F.softplus(a + eps)
    if mean_var is None:
        f = F.relu(depthwise(h, phi.scale_kernels)).mean((2, 3)).view(batch, channels, phi.h_dim)
        mean_var = f.mean(0), f.var(0, unbiased=True)
    mean, var = mean_var
    sizes = h.new_tensor([channels / phi.channel_norm, height / phi.spatial_norm]).expand(channels, 2)
    s = torch.sigmoid(torch.cat([mean, var, sizes], 1) @ phi.scale_fc.weight.t()).view(1, channels, 1, 1)
    m = (s * z - 1) * strength + 1
    return torch.clamp(m * h, max=phi.clip), mean_var
