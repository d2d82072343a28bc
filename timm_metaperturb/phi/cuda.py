"""φ's fused CUDA kernels, written in Triton: the same five entry points as the C++ CPU kernels (`cpu.py`),
so `fused.py` runs one autograd code for both devices.

On a GPU, φ on torch operators is bound by the host launching dozens of small kernels per site; here a site's
forward is three passes (channel mean, hidden layer, noise and modulation) plus one for the scale features, and
its backward five plus two. Each program takes one image and a tile of pixels through all channels, so the
cross-channel means (the equivariant layers' second kernel) are complete inside a program. The stencils read
their neighbours straight from memory (cache), the kernels' gradients are summed per program and then over
programs (deterministic: no atomics). eps is drawn inside the kernels from Triton's Philox generator, keyed by
(seed + image) and counted by position, so the backward can draw it again instead of keeping it.

Set TRITON_INTERPRET=1 before importing this module to run the kernels on a CPU (how the tests check them on a
machine without a GPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

Seed = int | Tensor | None  # eps's seed: an int, a one-element integer tensor on the GPU, or none


@dataclasses.dataclass(frozen=True)
class Tile:
    """The kernels' launch configuration: the largest tile a program takes per step (pixels x channels, powers of
    two) and the warps that run it. Any tile computes the same function; `benchmarks/cuda_tiles.py` times the
    choices on a GPU (on an H200 none beats the shipped one by more than 0.03x of the plain step: the kernels' own
    arithmetic, not their launch, is what costs)."""

    pixels: int = 128
    channels: int = 16
    warps: int = 4

    def __post_init__(self) -> None:  # checked once here, not at every launch
        if any(n < 1 or n & (n - 1) for n in dataclasses.astuple(self)):
            raise ValueError(f"{self}: a tile's pixels, channels and warps must be powers of two (Triton's blocks)")


TILE = Tile()  # read at every launch: set another Tile to launch with it (a CUDA graph keeps the one it captured)


@triton.jit
def _tile(H, W, BP: tl.constexpr):
    """This program's image, its index among all programs (where per-program partial sums go) and its tile of
    pixels: flat indices, rows, columns, and which of them lie in the H x W map."""
    b, tile = tl.program_id(1), tl.program_id(0)
    pixels = tile * BP + tl.arange(0, BP)
    return b, b * tl.num_programs(0) + tile, pixels, pixels // W, pixels % W, pixels < H * W


@triton.jit
def _shifted(ptr, base, channel_offset, row, col, dy: tl.constexpr, dx: tl.constexpr, height, width,
             stride_y, stride_x, mask):  # fmt: skip
    """Values at (row + dy, col + dx), zero outside the map (the convolutions' zero padding)."""
    r, c = row + dy, col + dx
    inside = mask & (r >= 0) & (r < height) & (c >= 0) & (c < width)
    return tl.load(ptr + base + channel_offset + r * stride_y + c * stride_x, mask=inside, other=0.0)


@triton.jit
def _stencil(ptr, base, channel_offset, row, col, w_ptr, height, width, stride_y, stride_x, mask,
             K: tl.constexpr, FLIP: tl.constexpr):  # fmt: skip
    """sum_t w[t] v[p + t - pad] (a cross-correlation, the convolution's forward) or, with FLIP, sum_t w[t]
    v[p - t + pad] (its gradient to the input)."""
    pad: tl.constexpr = K // 2
    acc = tl.zeros(mask.shape, tl.float32)
    for ty in tl.static_range(K):
        for tx in tl.static_range(K):
            sign = -1 if FLIP else 1
            w = tl.load(w_ptr + ty * K + tx)
            acc += w * _shifted(ptr, base, channel_offset, row, col, sign * (ty - pad), sign * (tx - pad), height,
                                width, stride_y, stride_x, mask)  # fmt: skip
    return acc


@triton.jit
def _tap_sums(acc, grad, ptr, base, channel_offset, row, col, height, width, stride_y, stride_x, mask,
              K: tl.constexpr, TAPS: tl.constexpr):  # fmt: skip
    """acc[t] += sum over the tile of grad[p] * v[p + t - pad]: a shared kernel's gradient, one slot per tap."""
    pad: tl.constexpr = K // 2
    slots = tl.arange(0, TAPS)
    for ty in tl.static_range(K):
        for tx in tl.static_range(K):
            v = _shifted(ptr, base, channel_offset, row, col, ty - pad, tx - pad, height, width, stride_y, stride_x,
                         mask)  # fmt: skip
            acc += tl.where(slots == ty * K + tx, tl.sum(grad * v), 0.0)
    return acc


@triton.jit
def _seed(seed_ptr, DRAWN: tl.constexpr):
    """The seed, read on the device (a CUDA graph replays each step with the seed drawn for it)."""
    if DRAWN:
        return tl.load(seed_ptr)
    else:
        return 0


@triton.jit
def _relu(v):
    """max(v, 0) with NaN kept (a plain maximum returns the other operand), as torch's relu does."""
    return tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _softplus(u):
    return _relu(u) + tl.log(1.0 + tl.exp(-tl.abs(u)))


@triton.jit
def _channel_mean_kernel(x_ptr, mean_ptr, C, H, W, sb, sc, sy, sx,
                         BC: tl.constexpr, BP: tl.constexpr):  # fmt: skip
    """mean over channels of x, one (H * W) row per image."""
    b, _, pixels, row, col, in_map = _tile(H, W, BP)
    acc = tl.zeros([BP], tl.float32)
    for c0 in range(0, C, BC):
        channels = c0 + tl.arange(0, BC)[:, None]
        mask = (channels < C) & in_map[None, :]
        acc += tl.sum(tl.load(x_ptr + b * sb + channels * sc + row[None, :] * sy + col[None, :] * sx, mask=mask,
                              other=0.0), axis=0)  # fmt: skip
    tl.store(mean_ptr + b * H * W + pixels, acc / C, mask=in_map)


@triton.jit
def _hidden_kernel(x_ptr, mean_x_ptr, w_self_ptr, w_mean_ptr, r_ptr, mean_r_ptr, C, H, W, sb, sc, sy, sx,
                   K: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr):  # fmt: skip
    """r = relu(E1(x)) and its channel mean."""
    b, _, pixels, row, col, in_map = _tile(H, W, BP)
    from_mean = _stencil(mean_x_ptr, b * H * W, 0, row, col, w_mean_ptr, H, W, W, 1, in_map, K, False)
    total = tl.zeros([BP], tl.float32)
    for c0 in range(0, C, BC):
        channels = c0 + tl.arange(0, BC)[:, None]
        mask = (channels < C) & in_map[None, :]
        r = _stencil(x_ptr, b * sb, channels * sc, row[None, :], col[None, :], w_self_ptr, H, W, sy, sx, mask, K,
                     False)  # fmt: skip
        r = tl.where(mask, _relu(r + from_mean[None, :]), 0.0)
        tl.store(r_ptr + b * sb + channels * sc + row[None, :] * sy + col[None, :] * sx, r, mask=mask)
        total += tl.sum(r, axis=0)
    tl.store(mean_r_ptr + b * H * W + pixels, total / C, mask=in_map)


@triton.jit
def _noise_logits(r_ptr, mean_r_ptr, w_self_ptr, w_mean_ptr, b, channels, row, col, from_mean, H, W, sb, sc, sy,
                  sx, mask, eps_ptr, seed, MODE: tl.constexpr, K: tl.constexpr):  # fmt: skip
    """a = E2(r), plus eps where sampled (MODE 0: eps read, 1: eps drawn from the seed; 2: a alone)."""
    a = _stencil(r_ptr, b * sb, channels * sc, row, col, w_self_ptr, H, W, sy, sx, mask, K, False) + from_mean
    offsets = b * sb + channels * sc + row * sy + col * sx
    if MODE == 0:
        a += tl.load(eps_ptr + offsets, mask=mask, other=0.0)
    elif MODE == 1:
        a += tl.randn(seed + b, channels * (H * W) + row * W + col)
    return a


@triton.jit
def _perturb_kernel(x_ptr, r_ptr, mean_r_ptr, w_self_ptr, w_mean_ptr, s_ptr, eps_ptr, seed_ptr, start_ptr, rise_ptr,
                    grid_limit, grid_step, grid_size, strength, clip, out_ptr, u_ptr, C, H, W, sb, sc, sy, sx,
                    MODE: tl.constexpr, KEEP_U: tl.constexpr, K: tl.constexpr, BC: tl.constexpr,
                    BP: tl.constexpr):  # fmt: skip
    """out = min(m * x, clip), m = s * z * k + 1 - k, z = softplus(a + eps) or (MODE 2) E[softplus(a + eps)]
    interpolated in the table."""
    b, _, _, row, col, in_map = _tile(H, W, BP)
    seed = _seed(seed_ptr, MODE == 1)
    from_mean = _stencil(mean_r_ptr, b * H * W, 0, row, col, w_mean_ptr, H, W, W, 1, in_map, K, False)[None, :]
    for c0 in range(0, C, BC):
        channels = c0 + tl.arange(0, BC)[:, None]
        mask = (channels < C) & in_map[None, :]
        u = _noise_logits(r_ptr, mean_r_ptr, w_self_ptr, w_mean_ptr, b, channels, row[None, :], col[None, :],
                          from_mean, H, W, sb, sc, sy, sx, mask, eps_ptr, seed, MODE, K)  # fmt: skip
        offsets = b * sb + channels * sc + row[None, :] * sy + col[None, :] * sx
        if MODE == 2:
            position = (u + grid_limit) / grid_step
            index = tl.minimum(tl.maximum(position, 0.0), grid_size - 1).to(tl.int32)  # NaN: 0, in the table
            position = _relu(position)  # NaN kept
            z = tl.load(start_ptr + index, mask=mask, other=0.0)
            z += (position - index) * tl.load(rise_ptr + index, mask=mask, other=0.0)
        else:
            z = _softplus(u)
            if KEEP_U:
                tl.store(u_ptr + offsets, u, mask=mask)
        s = tl.load(s_ptr + channels, mask=channels < C, other=0.0)
        out = (z * (s * strength) + (1.0 - strength)) * tl.load(x_ptr + offsets, mask=mask, other=0.0)
        tl.store(out_ptr + offsets, tl.where(out > clip, clip, out), mask=mask)


@triton.jit
def _perturb_backward_noise_kernel(grad_ptr, x_ptr, r_ptr, mean_r_ptr, w_self_ptr, w_mean_ptr, s_ptr, u_ptr, seed_ptr,
                                   strength, clip, grad_x_ptr, grad_u_ptr, grad_u_sum_ptr, grad_s_part_ptr, C, H,
                                   W, sb, sc, sy, sx, KEEP_U: tl.constexpr, K: tl.constexpr, BC: tl.constexpr,
                                   BP: tl.constexpr):  # fmt: skip
    """From the output's gradient: x's direct part (m times it), s's part (per program), and the gradient to
    u = a + eps with its channel sum (what E2's mean kernel passes back)."""
    b, program, pixels, row, col, in_map = _tile(H, W, BP)
    from_mean = _stencil(mean_r_ptr, b * H * W, 0, row, col, w_mean_ptr, H, W, W, 1, in_map, K, False)[None, :]
    grad_u_sum = tl.zeros([BP], tl.float32)
    seed = _seed(seed_ptr, not KEEP_U)
    for c0 in range(0, C, BC):
        channels = c0 + tl.arange(0, BC)[:, None]
        mask = (channels < C) & in_map[None, :]
        offsets = b * sb + channels * sc + row[None, :] * sy + col[None, :] * sx
        if KEEP_U:
            u = tl.load(u_ptr + offsets, mask=mask, other=0.0)
        else:
            u = _noise_logits(r_ptr, mean_r_ptr, w_self_ptr, w_mean_ptr, b, channels, row[None, :], col[None, :],
                              from_mean, H, W, sb, sc, sy, sx, mask, u_ptr, seed, 1, K)  # fmt: skip
        s = tl.load(s_ptr + channels, mask=channels < C, other=0.0)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
        z = _softplus(u)
        m = z * (s * strength) + (1.0 - strength)
        grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0)
        grad = tl.where(clip - m * x > 0.0, grad, 0.0)  # 0 where clipped
        tl.store(grad_x_ptr + offsets, grad * m, mask=mask)
        grad_mx = grad * x
        tl.store(grad_s_part_ptr + program * C + channels, tl.sum(grad_mx * z, axis=1)[:, None] * strength,
                 mask=channels < C)  # fmt: skip
        grad_u = tl.where(mask, grad_mx * (s * strength) / (1.0 + tl.exp(-u)), 0.0)
        tl.store(grad_u_ptr + offsets, grad_u, mask=mask)
        grad_u_sum += tl.sum(grad_u, axis=0)
    tl.store(grad_u_sum_ptr + b * H * W + pixels, grad_u_sum, mask=in_map)


@triton.jit
def _equivariant_backward_kernel(grad_ptr, grad_sum_ptr, input_ptr, input_mean_ptr, w_self_ptr, w_mean_ptr,
                                 out_ptr, out_sum_ptr, grad_w_part_ptr, slot, C, H, W, sb, sc, sy, sx,
                                 GATED: tl.constexpr, ACCUMULATE: tl.constexpr, WEIGHT_GRADS: tl.constexpr,
                                 K: tl.constexpr, TAPS: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr):  # fmt: skip
    """An equivariant layer's backward from its output's gradient g (and g's channel sum): the gradient to its
    input, E_self^T g + E_mean^T sum_c g / C, times relu's gate (input > 0) where GATED, added to out where
    ACCUMULATE, else stored with its channel sum; and with WEIGHT_GRADS its two kernels' gradients per program (at
    slot, slot + 1)."""
    b, program, pixels, row, col, in_map = _tile(H, W, BP)
    from_sum = _stencil(grad_sum_ptr, b * H * W, 0, row, col, w_mean_ptr, H, W, W, 1, in_map, K, True)[None, :] / C
    grad_w_self = tl.zeros([TAPS], tl.float32)
    out_sum = tl.zeros([BP], tl.float32)
    for c0 in range(0, C, BC):
        channels = c0 + tl.arange(0, BC)[:, None]
        mask = (channels < C) & in_map[None, :]
        offsets = b * sb + channels * sc + row[None, :] * sy + col[None, :] * sx
        grad_in = _stencil(grad_ptr, b * sb, channels * sc, row[None, :], col[None, :], w_self_ptr, H, W, sy, sx,
                           mask, K, True) + from_sum  # fmt: skip
        if GATED:
            grad_in = tl.where(mask & (tl.load(input_ptr + offsets, mask=mask, other=0.0) > 0.0), grad_in, 0.0)
        if ACCUMULATE:
            tl.store(out_ptr + offsets, tl.load(out_ptr + offsets, mask=mask, other=0.0) + grad_in, mask=mask)
        else:
            tl.store(out_ptr + offsets, grad_in, mask=mask)
            out_sum += tl.sum(tl.where(mask, grad_in, 0.0), axis=0)
        if WEIGHT_GRADS:
            grad_w_self = _tap_sums(grad_w_self, tl.load(grad_ptr + offsets, mask=mask, other=0.0), input_ptr,
                                    b * sb, channels * sc, row[None, :], col[None, :], H, W, sy, sx, mask, K,
                                    TAPS)  # fmt: skip
    if not ACCUMULATE:
        tl.store(out_sum_ptr + b * H * W + pixels, out_sum, mask=in_map)
    if WEIGHT_GRADS:
        grad_sum = tl.load(grad_sum_ptr + b * H * W + pixels, mask=in_map, other=0.0)
        grad_w_mean = _tap_sums(tl.zeros([TAPS], tl.float32), grad_sum, input_mean_ptr, b * H * W, 0, row, col, H,
                                W, W, 1, in_map, K, TAPS)  # fmt: skip
        slots = tl.arange(0, TAPS)
        tl.store(grad_w_part_ptr + (program * 4 + slot) * TAPS + slots, grad_w_self)
        tl.store(grad_w_part_ptr + (program * 4 + slot + 1) * TAPS + slots, grad_w_mean)


@triton.jit
def _scale_features_kernel(x_ptr, kernels_ptr, part_ptr, C, H, W, sb, sc, sy, sx, H_DIM: tl.constexpr,
                           K: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr):  # fmt: skip
    """Per program: sum over its pixels of relu(K_i * x) for every channel and shared kernel."""
    b, program, _, row, col, in_map = _tile(H, W, BP)
    for c0 in range(0, C, BC):
        channels = c0 + tl.arange(0, BC)[:, None]
        mask = (channels < C) & in_map[None, :]
        for i in tl.static_range(H_DIM):
            pre = _stencil(x_ptr, b * sb, channels * sc, row[None, :], col[None, :], kernels_ptr + i * K * K, H, W,
                           sy, sx, mask, K, False)  # fmt: skip
            total = tl.sum(tl.where(mask, _relu(pre), 0.0), axis=1)[:, None]
            tl.store(part_ptr + (program * C + channels) * H_DIM + i, total, mask=channels < C)


@triton.jit
def _scale_features_active_kernel(grad_f_ptr, x_ptr, kernels_ptr, active_ptr, grad_k_part_ptr, C, H, W, sb, sc,
                                  sy, sx, H_DIM: tl.constexpr, H_PAD: tl.constexpr, KERNEL_GRADS: tl.constexpr,
                                  K: tl.constexpr, TAPS: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr):  # fmt: skip
    """Where each K_i * x > 0, as bit i of one small integer per element, and with KERNEL_GRADS the kernels'
    gradients per program: sum over the tile of g_i / HW * [K_i * x > 0] * x[p + t - pad]."""
    b, program, _, row, col, in_map = _tile(H, W, BP)
    grad_k = tl.zeros([H_PAD, TAPS], tl.float32)
    for c0 in range(0, C, BC):
        channels = c0 + tl.arange(0, BC)[:, None]
        mask = (channels < C) & in_map[None, :]
        bits = tl.zeros([BC, BP], tl.int32)
        for i in tl.static_range(H_DIM):
            pre = _stencil(x_ptr, b * sb, channels * sc, row[None, :], col[None, :], kernels_ptr + i * K * K, H, W,
                           sy, sx, mask, K, False)  # fmt: skip
            active = mask & (pre > 0.0)
            bits |= active.to(tl.int32) << i
            if KERNEL_GRADS:
                weight = tl.load(grad_f_ptr + (b * C + channels) * H_DIM + i, mask=channels < C, other=0.0) / (H * W)
                taps = _tap_sums(tl.zeros([TAPS], tl.float32), tl.where(active, weight, 0.0), x_ptr, b * sb,
                                 channels * sc, row[None, :], col[None, :], H, W, sy, sx, mask, K, TAPS)  # fmt: skip
                grad_k += tl.where(tl.arange(0, H_PAD)[:, None] == i, taps[None, :], 0.0)
        offsets = b * sb + channels * sc + row[None, :] * sy + col[None, :] * sx
        tl.store(active_ptr + offsets, bits.to(active_ptr.dtype.element_ty), mask=mask)
    if KERNEL_GRADS:
        slots = (program * H_PAD + tl.arange(0, H_PAD)[:, None]) * TAPS + tl.arange(0, TAPS)[None, :]
        tl.store(grad_k_part_ptr + slots, grad_k)


# Triton 3.6 miscompiles this kernel when it specialises the map's sizes and strides (multiples of 16): on an H200
# grad_x came out up to 4% wrong for NCHW maps 16 pixels wide, while the interpreter and the unspecialised build
# agree with the formulas (tests/test_phi_fused.py, shape (2, 16, 5, 16)).
@triton.jit(do_not_specialize=["C", "H", "W", "sb", "sc", "sy", "sx"])
def _scale_features_backward_kernel(grad_f_ptr, active_ptr, kernels_ptr, grad_x_ptr, C, H, W, sb, sc, sy, sx,
                                    H_DIM: tl.constexpr, K: tl.constexpr, BC: tl.constexpr,
                                    BP: tl.constexpr):  # fmt: skip
    """grad_x = sum_i K_i^T (g_i / HW * [K_i * x > 0]), the activity read as bits at each neighbour."""
    b, _, _, row, col, in_map = _tile(H, W, BP)
    row, col, in_map = row[None, :], col[None, :], in_map[None, :]
    pad: tl.constexpr = K // 2
    for c0 in range(0, C, BC):
        channels = c0 + tl.arange(0, BC)[:, None]
        mask = (channels < C) & in_map
        grad_x = tl.zeros([BC, BP], tl.float32)
        for ty in tl.static_range(K):
            for tx in tl.static_range(K):
                bits = _shifted(active_ptr, b * sb, channels * sc, row, col, pad - ty, pad - tx, H, W, sy, sx, mask)
                bits = bits.to(tl.int32)
                for i in tl.static_range(H_DIM):
                    weight = tl.load(kernels_ptr + i * K * K + ty * K + tx) / (H * W)
                    weight *= tl.load(grad_f_ptr + (b * C + channels) * H_DIM + i, mask=channels < C, other=0.0)
                    grad_x += tl.where(((bits >> i) & 1) != 0, weight, 0.0)
        tl.store(grad_x_ptr + b * sb + channels * sc + row * sy + col * sx, grad_x, mask=mask)


# -- the entry points, with the C++ kernels' signatures ------------------------------------------------------------


def _on_tensors_device(entry_point):
    """Launch on the GPU of the entry point's first tensor: Triton launches on the current device, which need not
    be the one the tensors are on (a model moved to cuda:1 in a process whose current device is cuda:0)."""

    @functools.wraps(entry_point)
    def launch(first: torch.Tensor, *args):
        with torch.cuda.device(first.device) if first.is_cuda else contextlib.nullcontext():
            return entry_point(first, *args)

    return launch


def _geometry(x: torch.Tensor, kernel_size: int) -> dict:
    """Launch grid, tile sizes and strides for a (B, C, H, W) map in either layout."""
    batch, channels, height, width = x.shape
    pixels = min(TILE.pixels, triton.next_power_of_2(height * width))
    return {
        "grid": (triton.cdiv(height * width, pixels), batch),
        "shape": (channels, height, width, *x.stride()),
        "tiles": {"BC": min(TILE.channels, triton.next_power_of_2(channels)), "BP": pixels, "num_warps": TILE.warps},
        "K": kernel_size,
        "TAPS": triton.next_power_of_2(kernel_size * kernel_size),
        "programs": batch * triton.cdiv(height * width, pixels),
    }


def _seed_tensor(seed: Seed, x: Tensor) -> Tensor:
    """The seed as the one-element tensor the kernels read (x where there is none: a pointer left unread)."""
    return x if seed is None else torch.as_tensor(seed, device=x.device).reshape(1)


def _hidden(x: torch.Tensor, w_self: torch.Tensor, w_mean: torch.Tensor, g: dict) -> tuple[torch.Tensor, ...]:
    """x's channel mean, r = relu(E1(x)) and r's channel mean."""
    batch, _, height, width = x.shape
    mean_x = x.new_empty(batch, height * width)
    _channel_mean_kernel[g["grid"]](x, mean_x, *g["shape"], **g["tiles"])
    r, mean_r = torch.empty_like(x), torch.empty_like(mean_x)
    _hidden_kernel[g["grid"]](x, mean_x, w_self, w_mean, r, mean_r, *g["shape"], K=g["K"], **g["tiles"])
    return mean_x, r, mean_r


@_on_tensors_device
def perturb_forward(
    x: Tensor, eps: Tensor | None, seed: Seed, s: Tensor, w1_self: Tensor, w1_mean: Tensor, w2_self: Tensor,
    w2_mean: Tensor, start: Tensor, rise: Tensor, grid_limit: float, grid_step: float, strength: float, clip: float,
    keep_u: bool,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """(out, u): φ's noise path and modulation, eps given, drawn from `seed`, or (neither) replaced by its
    expectation from the table (start, rise, grid limit, grid step); u = a + eps only where kept."""
    g = _geometry(x, w1_self.shape[-1])
    _, r, mean_r = _hidden(x, w1_self, w1_mean, g)
    mode = 0 if eps is not None else 1 if seed is not None else 2
    out = torch.empty_like(x)
    u = torch.empty_like(x) if keep_u and mode != 2 else None
    table = (start, rise) if mode == 2 else (x, x)  # unused pointers where sampling
    _perturb_kernel[g["grid"]](
        x, r, mean_r, w2_self, w2_mean, s, x if eps is None else eps, _seed_tensor(seed, x), *table, grid_limit,
        grid_step, len(start), strength, clip, out, out if u is None else u, *g["shape"], MODE=mode,
        KEEP_U=u is not None, K=g["K"], **g["tiles"],
    )  # fmt: skip
    return out, u


@_on_tensors_device
def perturb_backward(
    grad: Tensor, x: Tensor, u: Tensor | None, seed: Seed, s: Tensor, w1_self: Tensor, w1_mean: Tensor,
    w2_self: Tensor, w2_mean: Tensor, strength: float, clip: float, weight_grads: bool,
) -> list[Tensor | None]:  # fmt: skip
    """[grad_x, grad_s, and the gradients to w1_self, w1_mean, w2_self, w2_mean (None without `weight_grads`)],
    from u kept or drawn again."""
    g = _geometry(x, w1_self.shape[-1])
    batch, channels, height, width = x.shape
    mean_x, r, mean_r = _hidden(x, w1_self, w1_mean, g)
    grad_x, grad_u = torch.empty_like(x), torch.empty_like(x)
    grad_u_sum = x.new_empty(batch, height * width)
    grad_s_part = x.new_empty(g["programs"], channels)
    grad_w_part = x.new_empty(g["programs"] if weight_grads else 0, 4, g["TAPS"])
    _perturb_backward_noise_kernel[g["grid"]](
        grad, x, r, mean_r, w2_self, w2_mean, s, x if u is None else u, _seed_tensor(seed, x), strength, clip,
        grad_x, grad_u, grad_u_sum, grad_s_part, *g["shape"], KEEP_U=u is not None, K=g["K"], **g["tiles"],
    )  # fmt: skip
    grad_pre, grad_pre_sum = torch.empty_like(x), torch.empty_like(grad_u_sum)
    _equivariant_backward_kernel[g["grid"]](
        grad_u, grad_u_sum, r, mean_r, w2_self, w2_mean, grad_pre, grad_pre_sum, grad_w_part, 2, *g["shape"],
        GATED=True, ACCUMULATE=False, WEIGHT_GRADS=weight_grads, K=g["K"], TAPS=g["TAPS"], **g["tiles"],
    )  # fmt: skip
    _equivariant_backward_kernel[g["grid"]](
        grad_pre, grad_pre_sum, x, mean_x, w1_self, w1_mean, grad_x, grad_pre_sum, grad_w_part, 0, *g["shape"],
        GATED=False, ACCUMULATE=True, WEIGHT_GRADS=weight_grads, K=g["K"], TAPS=g["TAPS"], **g["tiles"],
    )  # fmt: skip
    if not weight_grads:
        return [grad_x, grad_s_part.sum(0), None, None, None, None]
    grad_w = grad_w_part.sum(0)[:, : g["K"] ** 2].view(4, *w1_self.shape)
    return [grad_x, grad_s_part.sum(0), *grad_w.unbind(0)]


@_on_tensors_device
def scale_features_forward(x: torch.Tensor, kernels: torch.Tensor, keep_gates: bool) -> list[torch.Tensor | None]:
    """[f = GAP(relu(K * x)), (B, C, h_dim), None]: relu's gates are not kept (`keep_gates` is for the C++ kernels'
    interface); the backward finds them in the pass that also sums the kernels' gradients."""
    g = _geometry(x, kernels.shape[-1])
    batch, channels, height, width = x.shape
    part = x.new_empty(batch, g["grid"][0], channels, len(kernels))
    _scale_features_kernel[g["grid"]](x, kernels, part, *g["shape"], H_DIM=len(kernels), K=g["K"], **g["tiles"])
    return [part.sum(1) / (height * width), None]


@_on_tensors_device
def scale_features_backward(
    grad_f: torch.Tensor, x: torch.Tensor, gates: None, kernels: torch.Tensor, kernel_grads: bool
) -> list[torch.Tensor | None]:
    """[grad_x, grad_kernels (None without `kernel_grads`)] of `scale_features_forward`: which pre-activations are
    positive is found once here (a bit per kernel, one byte per element for up to 8 kernels; `gates`, the C++
    kernels' kept ones, is None), then read at every neighbour."""
    g, h_dim = _geometry(x, kernels.shape[-1]), len(kernels)
    if h_dim > 31:
        raise ValueError(f"φ's CUDA kernels take at most 31 scale kernels, this φ has h_dim={h_dim}")
    h_pad, grad_f = triton.next_power_of_2(h_dim), grad_f.contiguous()
    active = torch.empty_like(x, dtype=torch.uint8 if h_dim <= 8 else torch.int32)
    part = x.new_empty(g["programs"] if kernel_grads else 0, h_pad, g["TAPS"])
    _scale_features_active_kernel[g["grid"]](
        grad_f, x, kernels, active, part, *g["shape"], H_DIM=h_dim, H_PAD=h_pad, KERNEL_GRADS=kernel_grads, K=g["K"],
        TAPS=g["TAPS"], **g["tiles"],
    )  # fmt: skip
    grad_x = torch.empty_like(x)
    _scale_features_backward_kernel[g["grid"]](
        grad_f, active, kernels, grad_x, *g["shape"], H_DIM=h_dim, K=g["K"], **g["tiles"]
    )  # fmt: skip
    return [grad_x, part.sum(0)[:h_dim, : g["K"] ** 2].reshape(kernels.shape) if kernel_grads else None]


@triton.jit
def _normal_kernel(out_ptr, seed_ptr, C, H, W, sb, sc, sy, sx, BC: tl.constexpr, BP: tl.constexpr):
    b, _, _, row, col, in_map = _tile(H, W, BP)
    seed = tl.load(seed_ptr)
    row, col = row[None, :], col[None, :]
    for c0 in range(0, C, BC):
        channels = c0 + tl.arange(0, BC)[:, None]
        mask = (channels < C) & in_map[None, :]
        eps = tl.randn(seed + b, channels * (H * W) + row * W + col)
        tl.store(out_ptr + b * sb + channels * sc + row * sy + col * sx, eps, mask=mask)


@_on_tensors_device
def normal_noise_like(x: Tensor, seed: int | Tensor) -> Tensor:
    """The eps ~ N(0, 1) that the kernels draw from `seed` for a map shaped like x, in x's layout."""
    g = _geometry(x, 1)
    out = torch.empty_like(x, dtype=torch.float32)
    _normal_kernel[g["grid"]](out, _seed_tensor(seed, x), *g["shape"], **g["tiles"])
    return out
