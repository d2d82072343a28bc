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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import moments_over_batch
from ..hub import PhiHubMixin
from . import fused as fused_ops
from .torch_ops import (
    GRID_LIMIT,
    GRID_STEP,
    SampledPerturbation,
    ScaleFeatures,
    channels_last,
    equivariant,
    expected_softplus,
    expected_softplus_table,
    layout_of,
    modulate,
    relayout,
)

EVAL_NOISE = ("sample", "mean")
COMPONENTS = ("noise", "scale")  # φ's two factors: the input-dependent noise z and the per-channel scale s


@dataclass(frozen=True)
class RunMode:
    """How φ runs for one network: held by what attaches φ to it (the injection) and passed to every call, so that
    one φ shared by several networks is only read, never switched by one of them."""

    eval_noise: str = "sample"  # at eval: "sample" eps (the reference) or use its expectation ("mean")
    components: tuple[str, ...] = COMPONENTS  # both; ("noise",) fixes s = 1, ("scale",) fixes z = 1 (ablations)
    fused_kernels: bool = True  # the compiled kernels of fused.py where they load; False: torch operators
    # the backward draws eps again from its seed rather than keeping u, a feature map per site; None: where
    # drawing is cheap (the fused kernels, accelerators), not with torch operators on a CPU
    redraw_noise: bool | None = None
    # one process's part of a data-parallel batch with synchronised statistics: the place of its first image in the
    # global batch, so that eps is what one process draws for those images (`global_batch_noise`)
    first_image: int = 0

    def __post_init__(self) -> None:
        if self.eval_noise not in EVAL_NOISE:
            raise ValueError(f"eval noise must be one of {EVAL_NOISE}, got {self.eval_noise!r}")
        components = (self.components,) if isinstance(self.components, str) else tuple(self.components)
        if not components or set(components) - set(COMPONENTS):
            raise ValueError(f"φ's components must be a non-empty subset of {COMPONENTS}, got {self.components}")
        object.__setattr__(self, "components", components)


DEFAULT_MODE = RunMode()


def global_batch_noise(
    x: torch.Tensor, seed: torch.Tensor | int, first_image: int, fused: bool, site: str
) -> torch.Tensor:
    """The eps the fused kernels draw from `seed` for images first_image to first_image + B of a batch (x holds B):
    the counter-based generator keys eps by the image's place in the batch, so the images before are drawn too and
    left out (a cost that grows with the process's rank)."""
    if not fused:
        raise RuntimeError(
            f"MetaPerturb at site '{site}': noise matching one process's across processes (synchronised statistics) "
            "needs φ's fused kernels: keep RunMode.fused_kernels on, with a C++ compiler on CPUs"
        )
    ahead = x.new_empty((first_image + x.shape[0], *x.shape[1:])).contiguous(memory_format=fused_ops.layout(x))
    return fused_ops.normal_noise_like(ahead, seed)[first_image:]


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
        return equivariant(x, self.weight_self.float(), self.weight_mean.float())


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

    NOISE_MODULES = ("noise1", "noise2")  # the noise generator; every other parameter is the scale function's

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
        self.noise1 = EquivariantConv2d(kernel_size)
        self.noise2 = EquivariantConv2d(kernel_size)
        self.scale_kernels = nn.Parameter(torch.empty(h_dim, 1, kernel_size, kernel_size))
        self.scale_fc = nn.Linear(2 * h_dim + 2, 1, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's initialisation: every parameter ~ N(0, 0.01^2)."""
        for p in self.parameters():
            nn.init.normal_(p, std=0.01)

    def is_noise_parameter(self, name: str) -> bool:
        """Whether the parameter or state entry `name` belongs to the noise generator (else to the scale function)."""
        return name.split(".")[0] in self.NOISE_MODULES

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
        return self.noise2(F.relu(self.noise1(channels_last(h))))

    def scale_features(self, h: torch.Tensor, mode: RunMode = DEFAULT_MODE) -> torch.Tensor:
        """f = GAP(relu(K * h)) of shape (B, C, h_dim): what the scale's statistics summarise."""
        kernels = self.scale_kernels.float()
        if self._fused(h, mode):
            keep_gates = torch.is_grad_enabled() and (h.requires_grad or kernels.requires_grad)
            return fused_ops.scale_features(h.contiguous(memory_format=fused_ops.layout(h)), kernels, keep_gates)[0]
        return ScaleFeatures.apply(channels_last(h), kernels)

    def _fused(self, x: torch.Tensor, mode: RunMode) -> bool:
        return mode.fused_kernels and fused_ops.usable(x)

    def noise_weights(self) -> list[torch.Tensor]:
        """E1's and E2's self and mean kernels in float32, in the order the fused kernels take them."""
        return [w.float() for layer in (self.noise1, self.noise2) for w in (layer.weight_self, layer.weight_mean)]

    def scale(self, mean: torch.Tensor, var: torch.Tensor, height: int) -> torch.Tensor:
        """s in [0, 1]^C from the (C, h_dim) statistics, the channel count and the feature map height."""
        weight = self.scale_fc.weight.float()[0]
        # the two size inputs as python numbers (no host-to-device copy, so a CUDA graph can capture φ)
        sizes = weight[-2] * (mean.shape[0] / self.channel_norm) + weight[-1] * (height / self.spatial_norm)
        return torch.sigmoid(F.linear(torch.cat([mean, var], 1), weight[None, :-2]).squeeze(1) + sizes)

    def channel_statistics(
        self, h: torch.Tensor, stats: SiteStatistics | None, site: str = "φ", mode: RunMode = DEFAULT_MODE
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
        f = self.scale_features(h, mode)
        mean, var = moments_over_batch(f)
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
        mode: RunMode = DEFAULT_MODE,
        training: bool | None = None,
    ) -> torch.Tensor:
        """Perturb a (B, C, H, W) feature map; `noise` fixes eps (tests), `site` names the caller in errors.
        `training` (default: φ's own flag) decides between sampled noise and `mode.eval_noise`: the injection
        passes its network's, since a φ shared by several networks has one flag for all of them.

        φ always computes in float32 (under autocast too) and returns h's dtype, so half-precision networks get
        a finite perturbation.
        """
        if h.dim() != 4:
            raise ValueError(f"MetaPerturb at site '{site}' needs a 4-D (B, C, H, W) feature map, got {tuple(h.shape)}")
        with torch.autocast(device_type=h.device.type, enabled=False):
            x = h.float()
            exporting = torch.compiler.is_exporting() or torch.jit.is_tracing()  # for exporters: torch operators
            fused = self._fused(x, mode) and not exporting  # fused kernels read either layout; torch ops channels-last
            x = x.contiguous(memory_format=fused_ops.layout(x)) if fused else channels_last(x)
            if "scale" in mode.components:
                mean, var = self.channel_statistics(x, stats, site, mode)
                s = self.scale(mean, var, x.shape[-2]).view(1, -1, 1, 1)
            else:
                s = x.new_ones(1, x.shape[1], 1, 1)
            if "noise" not in mode.components:
                out = modulate(x, x.new_ones(()).expand_as(x), s, strength, self.clip, in_place=False)
            elif not (self.training if training is None else training) and mode.eval_noise == "mean":
                needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, s, *self.parameters()))
                if fused and not needs_grad:  # the fused single pass has no backward
                    table = (*expected_softplus_table(x.device, x.dtype), GRID_LIMIT, GRID_STEP)
                    weights = self.noise_weights()
                    out = fused_ops.expected_perturbation(x, s.view(-1), *weights, *table, strength, self.clip)
                else:
                    x = channels_last(x)
                    z = expected_softplus(self.noise_logits(x))
                    out = modulate(x, z, s, strength, self.clip, in_place=not z.requires_grad)
            else:
                if exporting:
                    raise RuntimeError(
                        f"MetaPerturb at site '{site}' samples its noise, which an exported graph cannot do: export "
                        "the deterministic evaluation, after timm_metaperturb.finalize_for_inference(model, batches) "
                        "and model.eval()"
                    )
                if noise is None and mode.first_image:
                    noise = global_batch_noise(x, fused_ops.draw_seed(x, fused), mode.first_image, fused, site)
                cheap_draw = fused or x.device.type != "cpu"
                redraw = noise is None and (cheap_draw if mode.redraw_noise is None else mode.redraw_noise)
                # eps given, or a seed drawn from torch's generator: the fused kernels draw eps from it, torch
                # operators too and again in the backward where `redraw`
                seed = fused_ops.draw_seed(x, fused) if noise is None else None
                weights = self.noise_weights()
                if fused:
                    eps = None if noise is None else noise.float().contiguous(memory_format=fused_ops.layout(x))
                    out, _ = fused_ops.perturb(x, eps, seed, s.view(-1), *weights, strength, self.clip, not redraw)
                else:  # x is channels-last already
                    eps = seed if noise is None else relayout(noise.float(), torch.channels_last)
                    out = SampledPerturbation.apply(x, eps, redraw, s, *weights, strength, self.clip)
        return relayout(out, layout_of(h)).to(h.dtype)
