"""φ's fused CPU kernels (`phi_cpu.py`): used by default on a CPU, the same function as the torch operators
(forward, gradients, running statistics, the single-pass evaluation), deterministic, and a fallback that keeps
φ working where they cannot be built."""

import pytest
import torch
from conftest import strong_phi

from benchmarks.overhead import saved_bytes
from timm_metaperturb import SiteStatistics, phi_cpu
from timm_metaperturb.phi_reference import reference_perturb

CLIP = 3.0  # low enough that some outputs are clipped

if phi_cpu.cpu_kernels() is None:
    pytest.skip("φ's CPU kernels cannot be built here (no C++ compiler)", allow_module_level=True)


def graph_nodes(out: torch.Tensor) -> set[str]:
    """The type names of every node of out's autograd graph."""
    names, seen, stack = set(), set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        names.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


def test_fused_kernels_run_by_default_on_cpu():
    h = torch.randn(4, 6, 8, 8, requires_grad=True)
    nodes = graph_nodes(strong_phi(clip=CLIP)(h, SiteStatistics(6, 4).train()))
    assert {"FusedPerturbationBackward", "FusedScaleFeaturesBackward"} <= nodes
    phi = strong_phi(clip=CLIP)
    phi.fused_cpu = False
    assert "FusedPerturbationBackward" not in graph_nodes(phi(h, SiteStatistics(6, 4).train()))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("shape", [(6, 5, 9, 11), (3, 1, 1, 1), (2, 33, 4, 3)])
def test_fused_equals_reference_forward_and_gradients(layout, kernel_size, shape):
    """Against the formulas with autograd, at strength 0.6 with some outputs clipped: output, running statistics,
    gradients to h and to all of φ's parameters; one channel, 1x1 maps and maps smaller than the kernel too."""
    phi = strong_phi(kernel_size, CLIP)
    h = (torch.randn(shape) * 2).contiguous(memory_format=layout).requires_grad_()
    eps, grad_out = torch.randn(shape), torch.randn(shape)
    stats = SiteStatistics(shape[1], 4).train()
    out = phi(h, stats, strength=0.6, noise=eps)
    expected, (mean, _) = reference_perturb(phi, h, eps, strength=0.6)
    assert out.is_contiguous(memory_format=layout)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.running_mean, 0.1 * mean, rtol=1e-5, atol=1e-6)
    inputs = [h, *phi.parameters()]
    for fused, ref in zip(*(torch.autograd.grad(y, inputs, grad_out) for y in (out, expected)), strict=True):
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5 * max(ref.abs().max().item(), 1.0))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_fused_single_pass_equals_torch_operators(layout):
    """The deterministic single pass (noise replaced by its expectation) at eval, with running statistics."""
    fused, plain = strong_phi(clip=CLIP).eval(), strong_phi(clip=CLIP).eval()
    plain.fused_cpu = False
    for phi in (fused, plain):
        phi.eval_noise = "mean"
    stats = SiteStatistics(7, 4).eval()
    stats.running_mean.uniform_(0, 1)
    h = (torch.randn(5, 7, 10, 10) * 3).contiguous(memory_format=layout)
    with torch.no_grad():
        out = fused(h, stats, strength=0.8)
        assert out.grad_fn is None and out.is_contiguous(memory_format=layout)
        torch.testing.assert_close(out, plain(h, stats, strength=0.8), rtol=1e-5, atol=1e-5)
    # with gradients wanted, the single pass runs on torch operators, which have a backward
    assert fused(h.requires_grad_(), stats).requires_grad


def test_drawn_noise_is_the_generators_and_gradients_follow_it():
    """With eps drawn inside the kernel from a seed taken from torch's generator, φ computes the formulas with
    the eps that `normal_noise_like` gives for that seed."""
    phi = strong_phi(clip=CLIP)
    h = torch.randn(4, 6, 9, 9, requires_grad=True)
    torch.manual_seed(11)
    out = phi(h, SiteStatistics(6, 4).train(), strength=0.7)
    torch.manual_seed(11)
    eps = phi_cpu.normal_noise_like(
        h.detach().contiguous(memory_format=torch.channels_last), int(torch.randint(2**62, ()).item())
    )
    expected, _ = reference_perturb(phi, h, eps, strength=0.7)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    inputs = [h, *phi.parameters()]
    for fused, ref in zip(*(torch.autograd.grad(y.square().sum(), inputs) for y in (out, expected)), strict=True):
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5 * max(ref.abs().max().item(), 1.0))


def test_redrawn_noise_gives_the_same_gradients_from_less_memory():
    """With `redraw_noise` the backward computes u = a + eps again from eps's seed instead of keeping it: the same
    gradients, bit for bit, and a feature map less kept per site."""
    h = torch.randn(8, 16, 12, 12, requires_grad=True)
    results = {}
    for redraw in (False, True):
        phi = strong_phi(clip=CLIP)
        phi.redraw_noise = redraw
        torch.manual_seed(2)
        out, kept = saved_bytes(lambda phi=phi: phi(h, SiteStatistics(16, 4).train()))
        results[redraw] = (kept, out, *torch.autograd.grad(out.square().sum(), [h, *phi.parameters()]))
    (kept_u, *values_kept), (kept_seed, *values_redrawn) = results[False], results[True]
    assert all(torch.equal(a, b) for a, b in zip(values_kept, values_redrawn, strict=True))
    assert kept_u - kept_seed == h.numel() * 4  # u: one float32 map


def test_kernel_noise_is_standard_normal_and_independent():
    """The counter-based generator: N(0, 1) quantiles, no correlation between neighbours in any direction
    (channels, pixels, images, the two halves of a Box-Muller pair), a new stream per seed, and the same stream
    whatever the number of threads."""
    like = torch.empty(64, 17, 31, 31).contiguous(memory_format=torch.channels_last)  # odd sizes: an odd image
    eps = phi_cpu.normal_noise_like(like, 5)
    assert eps.shape == like.shape and eps.is_contiguous(memory_format=torch.channels_last)
    values = eps.flatten().sort().values
    probabilities = (torch.arange(len(values), dtype=torch.float64) + 0.5) / len(values)
    quantiles = torch.special.ndtri(probabilities).float()
    central = (probabilities > 0.001) & (probabilities < 0.999)
    assert (values - quantiles)[central].abs().max() < 0.02
    assert values[0] < -4 and values[-1] > 4  # tails reach 4 standard deviations (1.1M draws)
    flat = eps.permute(0, 2, 3, 1).reshape(64, -1)  # memory order: the generator's counter order per image
    half = flat.shape[1] // 2
    for a, b in [
        (eps[:, 1:], eps[:, :-1]),
        (eps[..., 1:], eps[..., :-1]),
        (eps[1:], eps[:-1]),
        (flat[:, :half], flat[:, half : 2 * half]),
    ]:
        assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].abs() < 0.01
    assert not torch.equal(eps, phi_cpu.normal_noise_like(like, 6))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(eps, phi_cpu.normal_noise_like(like, 5))
    finally:
        torch.set_num_threads(threads)


def test_same_seed_gives_identical_results_whatever_the_thread_count():
    """Every image runs on one thread and the per-image sums are added up in a fixed order: φ's output and
    gradients are the same bit for bit with 1 or 2 threads."""
    h = torch.randn(8, 16, 12, 12, requires_grad=True)
    results, threads = [], torch.get_num_threads()
    try:
        for count in (2, 2, 1):
            torch.set_num_threads(count)
            torch.manual_seed(3)
            phi = strong_phi(clip=CLIP)
            out = phi(h, SiteStatistics(16, 4).train())
            results.append((out, *torch.autograd.grad(out.square().sum(), [h, *phi.parameters()])))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


def test_disabled_or_unbuildable_kernels_fall_back_to_torch_operators(monkeypatch):
    h, eps = torch.randn(4, 6, 8, 8), torch.randn(4, 6, 8, 8)
    expected = strong_phi(clip=CLIP)(h, SiteStatistics(6, 4).train(), noise=eps)

    monkeypatch.setenv(phi_cpu.ENV_SWITCH, "0")
    assert not phi_cpu.usable(h)
    out = strong_phi(clip=CLIP)(h, SiteStatistics(6, 4).train(), noise=eps)
    assert "FusedPerturbationBackward" not in graph_nodes(out)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    monkeypatch.delenv(phi_cpu.ENV_SWITCH)
    monkeypatch.setattr(phi_cpu, "_loaded", {})

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr("torch.utils.cpp_extension.load", no_compiler)
    with pytest.warns(UserWarning, match="could not be built.*no C\\+\\+ compiler"):
        out = strong_phi(clip=CLIP)(h, SiteStatistics(6, 4).train(), noise=eps)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
