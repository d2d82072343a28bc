"""φ's fused kernels (`phi/fused.py`), C++ on a CPU and Triton on CUDA: used by default, the same function as
the torch operators (forward, gradients, running statistics, the single-pass evaluation), deterministic, and a
fallback that keeps φ working where they cannot run. Without a GPU the Triton kernels run in Triton's
interpreter on the CPU (TRITON_INTERPRET=1), standing in for the C++ ones."""

import sys

import pytest
import torch
from conftest import strong_phi

import timm_metaperturb
from benchmarks.overhead import saved_bytes
from timm_metaperturb.phi import RunMode, SiteStatistics
from timm_metaperturb.phi import cpu as phi_cpu
from timm_metaperturb.phi import fused as phi_fused
from timm_metaperturb.phi import module as phi_mod
from timm_metaperturb.phi import torch_ops as phi_ops
from timm_metaperturb.phi.reference import reference_perturb

CLIP = 3.0  # low enough that some outputs are clipped


def interpreted_triton_kernels():
    """phi/cuda.py's kernels, which run on CPU tensors in Triton's interpreter (conftest sets TRITON_INTERPRET=1
    where there is no GPU)."""
    pytest.importorskip("triton")
    from timm_metaperturb.phi import cuda as phi_cuda

    return phi_cuda


# GCC targets older than a CPU's own whose code paths differ: AVX2 without AVX-512, and no AVX (the portable loops,
# as on ARM), with the CPU flags they need. Each is built and tested on a CPU that can run it and builds another.
OLDER_TARGETS = {"haswell": {"avx2", "fma"}, "x86-64": set()}


def cpu_build(target: str):
    """φ's C++ kernels built for GCC's `target` ("native": this CPU's own build, the one φ runs), or a skip
    that says why they cannot be tested here."""
    kernels = phi_cpu.cpu_kernels()
    if kernels is None:
        pytest.skip("φ's CPU kernels cannot be built here (no C++ compiler)")
    if target == "native":
        return kernels
    flags = phi_cpu.cpu_flags()
    if not phi_cpu.X86 or not OLDER_TARGETS[target] <= flags:
        pytest.skip(f"this CPU cannot run code built for {target}")
    if (target == "haswell" and "avx512f" not in flags) or (target == "x86-64" and "avx2" not in flags):
        pytest.skip(f"this CPU's own build takes {target}'s code paths (tested as the native build)")
    return phi_cpu.build(target)


@pytest.fixture(params=["c++", "c++ haswell", "c++ x86-64", "triton"])
def device(request, monkeypatch) -> str:
    """Where φ runs on which fused kernels: the C++ ones on the CPU, built for this CPU and for the older targets
    it can run; the Triton ones on CUDA where there is a GPU, else interpreted on the CPU in the C++ kernels'
    place."""
    if request.param.startswith("c++"):
        kernels = cpu_build(request.param.partition(" ")[2] or "native")
        monkeypatch.setattr(phi_fused, "cpu_kernels", lambda: kernels)
        return "cpu"
    return triton_device(monkeypatch)


def triton_device(monkeypatch) -> str:
    """The device where φ's fused path runs the Triton kernels: CUDA, else the CPU with them interpreted."""
    if torch.cuda.is_available():
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the reference's exact convolutions
        return "cuda"
    monkeypatch.setattr(phi_fused, "cpu_kernels", interpreted_triton_kernels)
    return "cpu"


# the autograd nodes of φ's fused operators (torch.library names them after the operator)
FUSED_NOISE_PATH = "GeneratedBackwardFor_timm_metaperturb_perturb_defaultBackward"
FUSED_SCALE_FEATURES = "GeneratedBackwardFor_timm_metaperturb_scale_features_defaultBackward"


def graph_nodes(out: torch.Tensor) -> set[str]:
    """The type names of every node of out's autograd graph (a walk over all paths: the Python objects autograd
    hands out for its nodes are new at each access, so their ids cannot mark a node as seen)."""
    names, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None:
            names.add(type(node).__name__)
            stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


def test_fused_kernels_run_by_default(device):
    h = torch.randn(4, 6, 8, 8, device=device, requires_grad=True)
    nodes = graph_nodes(strong_phi(clip=CLIP).to(device)(h, SiteStatistics(6, 4).to(device).train()))
    assert {FUSED_NOISE_PATH, FUSED_SCALE_FEATURES} <= nodes
    phi, plain = strong_phi(clip=CLIP).to(device), RunMode(fused_kernels=False)
    assert FUSED_NOISE_PATH not in graph_nodes(phi(h, SiteStatistics(6, 4).to(device).train(), mode=plain))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("shape", [(6, 5, 9, 11), (3, 1, 1, 1), (2, 33, 4, 3), (2, 16, 5, 16)])
def test_fused_equals_reference_forward_and_gradients(layout, kernel_size, shape, device):
    """Against the formulas with autograd, at strength 0.6 with some outputs clipped: output, running statistics,
    gradients to h and to all of φ's parameters; one channel, 1x1 maps and maps smaller than the kernel too, and
    maps whose channels and pixels come in whole 16 x 16 blocks (the C++ kernels transpose 16 x 16 blocks in
    registers with AVX-512, 8 x 8 with AVX2)."""
    assert_fused_equals_reference(strong_phi(kernel_size, CLIP).to(device), shape, layout, device)


@pytest.mark.parametrize("tile", [(16, 2, 2), (256, 64, 8)])
def test_triton_kernels_compute_the_same_function_with_any_tile(tile, monkeypatch):
    """A tile smaller than the map in both pixels and channels (many programs, each looping over channel blocks,
    their partial sums added up) and one larger than it in both."""
    device, phi_cuda = triton_device(monkeypatch), interpreted_triton_kernels()
    monkeypatch.setattr(phi_cuda, "TILE", phi_cuda.Tile(*tile))
    assert_fused_equals_reference(strong_phi(3, CLIP).to(device), (2, 5, 9, 11), torch.contiguous_format, device)


def test_a_tile_triton_cannot_launch_is_refused_with_what_to_change():
    phi_cuda = interpreted_triton_kernels()
    for sizes in ({"pixels": 100}, {"channels": 0}, {"warps": 3}):
        with pytest.raises(ValueError, match="powers of two"):
            phi_cuda.Tile(**sizes)


@pytest.mark.parametrize("h_dim", [1, 6])
def test_fused_scale_features_take_any_number_of_kernels(h_dim, device):
    """The C++ kernels run the scale's kernels four at a time: fewer, or a remainder, is the same function."""
    phi = strong_phi(clip=CLIP, h_dim=h_dim).to(device)
    assert_fused_equals_reference(phi, (3, 5, 7, 6), torch.contiguous_format, device)


def test_frozen_phi_gets_no_kernel_gradients_and_the_same_input_gradient(device):
    """φ frozen (target training): its kernels' gradients are not computed at all, and h's gradient is the one
    a trainable φ gives, bit for bit."""
    h = torch.randn(4, 6, 9, 9, device=device, requires_grad=True)
    grads = {}
    for frozen in (False, True):
        phi = strong_phi(clip=CLIP).to(device).requires_grad_(not frozen)
        torch.manual_seed(5)
        out = phi(h, SiteStatistics(6, 4).to(device).train())
        grads[frozen] = torch.autograd.grad(out.square().sum(), h)[0]
    assert torch.equal(grads[False], grads[True])
    kernels, x, grad = phi_fused.device_kernels(h), h.detach(), torch.randn_like(h)
    *_, grad_w1_self, _, _, grad_w2_mean = kernels.perturb_backward(
        grad, x, None, 5, torch.ones(6, device=device), *phi.noise_weights(), 1.0, CLIP, False
    )
    _, grad_scale_kernels = kernels.scale_features_backward(
        torch.randn(4, 6, 4, device=device), x, None, phi.scale_kernels.detach(), False
    )
    assert grad_w1_self is grad_w2_mean is grad_scale_kernels is None


@pytest.mark.parametrize("target", ["native", *OLDER_TARGETS])
@pytest.mark.parametrize("shape", [(3, 16, 6, 5), (2, 6, 4, 7), (2, 5, 7, 3)])
@pytest.mark.parametrize("kernel_grads", [False, True])
def test_kept_relu_gates_give_the_gradients_of_computing_the_stencils_again(shape, kernel_grads, target):
    """The C++ scale features keep relu's gates from the forward, a bit per value and kernel, 16 to a word along
    each row: the backward from them equals, bit for bit, the one that computes K * x again, for rows of whole
    words, with a remainder (42 values) and shorter than a word (15), where a pre-activation is exactly 0 (the
    zeroed corner: no gradient) and for the kernels' gradients too."""
    kernels = cpu_build(target)
    x = torch.randn(shape)
    x[:, :, :3, :3] = 0.0
    weights, grad_f = strong_phi(h_dim=6).scale_kernels.detach(), torch.randn(shape[0], shape[1], 6)
    f, gates = kernels.scale_features_forward(x, weights, True)
    f_alone, no_gates = kernels.scale_features_forward(x, weights, False)
    assert torch.equal(f, f_alone) and no_gates is None
    assert gates.shape == (shape[0], 6, shape[2], (shape[1] * shape[3] + 15) // 16)
    kept = kernels.scale_features_backward(grad_f, x, gates, weights, kernel_grads)
    again = kernels.scale_features_backward(grad_f, x, None, weights, kernel_grads)
    for from_gates, recomputed in zip(kept, again, strict=True):
        assert (from_gates is None and recomputed is None) or torch.equal(from_gates, recomputed)
    with pytest.raises(RuntimeError, match="gates must be the ones scale_features_forward kept"):
        kernels.scale_features_backward(grad_f, x, gates[:, :4], weights[:4], False)


def assert_fused_equals_reference(phi, shape, layout, device):
    h = (torch.randn(shape, device=device) * 2).contiguous(memory_format=layout).requires_grad_()
    eps, grad_out = torch.randn(shape, device=device), torch.randn(shape, device=device)
    stats = SiteStatistics(shape[1], phi.h_dim).to(device).train()
    out = phi(h, stats, strength=0.6, noise=eps)
    expected, (mean, _) = reference_perturb(phi, h, eps, strength=0.6)
    assert out.is_contiguous(memory_format=layout)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.running_mean, 0.1 * mean, rtol=1e-5, atol=1e-6)
    inputs = [h, *phi.parameters()]
    for fused, ref in zip(*(torch.autograd.grad(y, inputs, grad_out) for y in (out, expected)), strict=True):
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5 * max(ref.abs().max().item(), 1.0))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("channels", [7, 19])
def test_fused_single_pass_equals_torch_operators(layout, channels, device):
    """The deterministic single pass (noise replaced by its expectation) at eval, with running statistics; with
    fewer channels than a vector, and with whole vectors and a remainder."""
    phi = strong_phi(clip=CLIP).to(device).eval()
    fused, plain = RunMode(eval_noise="mean"), RunMode(eval_noise="mean", fused_kernels=False)
    stats = SiteStatistics(channels, 4).to(device).eval()
    stats.running_mean.uniform_(0, 1)
    h = (torch.randn(5, channels, 10, 10, device=device) * 3).contiguous(memory_format=layout)
    with torch.no_grad():
        out = phi(h, stats, strength=0.8, mode=fused)
        assert out.grad_fn is None and out.is_contiguous(memory_format=layout)
        torch.testing.assert_close(out, phi(h, stats, strength=0.8, mode=plain), rtol=1e-5, atol=1e-5)
    # with gradients wanted, the single pass runs on torch operators, which have a backward
    assert phi(h.requires_grad_(), stats, mode=fused).requires_grad


def test_single_pass_keeps_a_nan_to_its_own_image(device):
    """A NaN in a map at eval (where no error is raised: running statistics are not updated) comes out as NaN in
    its image and leaves the others alone, on the fused kernels and on torch operators: the expected-softplus
    table is read at a safe index."""
    h = torch.randn(3, 11, 6, 6, device=device)
    h[1, 2, 3, 3] = float("nan")
    for fused in (True, False):
        phi = strong_phi(clip=CLIP).to(device).eval()
        with torch.no_grad():
            out = phi(h, SiteStatistics(11, 4).to(device).eval(), mode=RunMode(eval_noise="mean", fused_kernels=fused))
        assert out[1].isnan().any() and not out[[0, 2]].isnan().any()


def test_drawn_noise_is_the_generators_and_gradients_follow_it(device):
    """With eps drawn inside the kernel from a seed taken from torch's generator, φ computes the formulas with
    the eps that `normal_noise_like` gives for that seed."""
    phi = strong_phi(clip=CLIP).to(device)
    h = torch.randn(4, 6, 9, 9, device=device, requires_grad=True)
    torch.manual_seed(11)
    out = phi(h, SiteStatistics(6, 4).to(device).train(), strength=0.7)
    torch.manual_seed(11)
    like = h.detach().contiguous(memory_format=torch.channels_last)
    eps = phi_fused.normal_noise_like(like, phi_fused.draw_seed(h, fused=True))
    expected, _ = reference_perturb(phi, h, eps, strength=0.7)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    inputs = [h, *phi.parameters()]
    for fused, ref in zip(*(torch.autograd.grad(y.square().sum(), inputs) for y in (out, expected)), strict=True):
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5 * max(ref.abs().max().item(), 1.0))


def test_redrawn_noise_gives_the_same_gradients_from_less_memory(device):
    """With `redraw_noise` the backward computes u = a + eps again from eps's seed instead of keeping it: the same
    gradients, bit for bit, and a feature map less kept per site."""
    h = torch.randn(8, 16, 12, 12, device=device, requires_grad=True)
    results = {}
    for redraw in (False, True):
        phi, mode = strong_phi(clip=CLIP).to(device), RunMode(redraw_noise=redraw)
        torch.manual_seed(2)
        out, kept = saved_bytes(lambda phi=phi, mode=mode: phi(h, SiteStatistics(16, 4).to(device).train(), mode=mode))
        results[redraw] = (kept, out, *torch.autograd.grad(out.square().sum(), [h, *phi.parameters()]))
    (kept_u, *values_kept), (kept_seed, *values_redrawn) = results[False], results[True]
    assert all(torch.equal(a, b) for a, b in zip(values_kept, values_redrawn, strict=True))
    assert kept_u - kept_seed == h.numel() * 4 - 8  # u (one float32 map) kept instead of eps's seed (one int64)


def test_kernel_noise_is_standard_normal_and_independent(device):
    """The counter-based generators: N(0, 1) quantiles, no correlation between neighbours in any direction
    (channels, pixels, images, the two halves of a Box-Muller pair on the CPU), a new stream per seed."""
    like = torch.empty(64, 17, 31, 31, device=device).contiguous(memory_format=torch.channels_last)  # odd sizes
    eps = phi_fused.normal_noise_like(like, 5)
    assert eps.shape == like.shape and eps.is_contiguous(memory_format=torch.channels_last)
    values = eps.flatten().sort().values.cpu()
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
    assert not torch.equal(eps, phi_fused.normal_noise_like(like, 6))
    assert torch.equal(eps, phi_fused.normal_noise_like(like, 5))


def test_same_seed_gives_identical_results_whatever_the_thread_count(device):
    """Every image runs on one thread and the per-image sums are added up in a fixed order (on CUDA: one program
    per tile, partial sums added without atomics): φ's output and gradients are the same bit for bit, run again
    and, on the CPU, with 1 or 2 threads."""
    h = torch.randn(8, 16, 12, 12, device=device, requires_grad=True)
    results, threads = [], torch.get_num_threads()
    try:
        for count in (2, 2, 1):
            torch.set_num_threads(count)
            torch.manual_seed(3)
            phi = strong_phi(clip=CLIP).to(device)
            out = phi(h, SiteStatistics(16, 4).to(device).train())
            results.append((out, *torch.autograd.grad(out.square().sum(), [h, *phi.parameters()])))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


def test_disabled_or_unbuildable_kernels_fall_back_to_torch_operators(monkeypatch):
    h, eps = torch.randn(4, 6, 8, 8), torch.randn(4, 6, 8, 8)
    expected = strong_phi(clip=CLIP)(h, SiteStatistics(6, 4).train(), noise=eps)

    monkeypatch.setenv(phi_cpu.ENV_SWITCH, "0")
    assert not phi_fused.usable(h)
    out = strong_phi(clip=CLIP)(h, SiteStatistics(6, 4).train(), noise=eps)
    assert FUSED_NOISE_PATH not in graph_nodes(out)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    monkeypatch.delenv(phi_cpu.ENV_SWITCH)
    monkeypatch.setattr(phi_cpu, "_loaded", {})

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr("torch.utils.cpp_extension.load", no_compiler)
    with pytest.warns(UserWarning, match="could not be built.*no C\\+\\+ compiler"):
        out = strong_phi(clip=CLIP)(h, SiteStatistics(6, 4).train(), noise=eps)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_cuda_kernels_switched_off_or_without_triton_leave_torch_operators(monkeypatch):
    """On CUDA, φ runs on torch operators where the Triton kernels are switched off, or warns once and does so
    where Triton cannot be imported."""
    monkeypatch.setattr(phi_fused, "_cuda", {})
    monkeypatch.setenv(phi_fused.CUDA_SWITCH, "0")
    assert phi_fused.cuda_kernels() is None
    monkeypatch.delenv(phi_fused.CUDA_SWITCH)
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    monkeypatch.delitem(sys.modules, "timm_metaperturb.phi.cuda", raising=False)
    monkeypatch.delattr(timm_metaperturb.phi, "cuda", raising=False)
    with pytest.warns(UserWarning, match="need Triton"):
        assert phi_fused.cuda_kernels() is None
    assert phi_fused.cuda_kernels() is None  # once


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")
def test_cuda_graph_replays_draw_new_noise_and_keep_statistics_finite():
    """φ on CUDA captured in a CUDA graph: each replay draws new eps (the seed is drawn on the GPU), updates the
    running statistics, and a batch with NaNs, whose error a graph cannot raise, leaves them unchanged."""
    phi, stats = strong_phi(clip=CLIP).cuda(), SiteStatistics(6, 4).cuda().train()
    h = torch.randn(4, 6, 8, 8, device="cuda")
    phi(h, stats), phi(h, stats)  # warm-up: the kernels compiled before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = phi(h, stats)
    outputs = []
    for _ in range(2):
        graph.replay()
        outputs.append(out.clone())
    assert not torch.equal(*outputs)
    before = stats.running_mean.clone()
    graph.replay()
    assert not torch.equal(stats.running_mean, before)
    h[0, 0, 0, 0] = float("nan")
    before = stats.running_mean.clone(), stats.running_var.clone()
    graph.replay()
    assert torch.equal(stats.running_mean, before[0]) and torch.equal(stats.running_var, before[1])
    with pytest.raises(FloatingPointError, match="non-finite"):  # outside a graph, the error
        phi(h, stats)


def test_fused_operators_pass_torch_library_checks():
    """torch.library's opcheck on each of φ's operators (C++ kernels): the schema, the fake implementation that
    torch.compile plans shapes, strides and dtypes with, and the registered gradients agree with the kernels, in
    both layouts, with eps given or drawn from a seed, and u kept or drawn again."""
    cpu_build("native")
    phi = strong_phi(clip=CLIP)
    weights, kernels = phi.noise_weights(), phi.scale_kernels
    table = (*phi_ops.expected_softplus_table(torch.device("cpu"), torch.float32), 16.0, 1.0 / 256)
    frozen = [w.detach() for w in weights]
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 5, 6, 17).contiguous(memory_format=layout).requires_grad_()
        eps = torch.randn(2, 5, 6, 17).contiguous(memory_format=layout)
        s, seed = torch.rand(5, requires_grad=True), torch.tensor([3])
        for eps_or_seed, keep_u in (((None, seed), False), ((None, seed), True), ((eps, None), True)):
            for w in (weights, frozen):
                torch.library.opcheck(phi_fused.perturb, (x, *eps_or_seed, s, *w, 0.7, CLIP, keep_u))
        out_x, out_s = x.detach(), s.detach()
        torch.library.opcheck(phi_fused.expected_perturbation, (out_x, out_s, *frozen, *table, 0.7, CLIP))
        grad, u = torch.randn_like(eps), phi_fused.perturb(out_x, None, seed, out_s, *frozen, 0.7, CLIP, True)[1]
        for kept in ((u, None), (None, seed)):
            for weight_grads in (False, True):
                args = (grad, out_x, *kept, out_s, *frozen, 0.7, CLIP, weight_grads)
                torch.library.opcheck(phi_fused.perturb_backward, args)
        grad_f = torch.randn(2, 5, len(kernels))
        for keep_gates in (False, True):
            torch.library.opcheck(phi_fused.scale_features, (x, kernels, keep_gates))
            gates = phi_fused.scale_features(out_x, kernels.detach(), keep_gates)[1] if keep_gates else None
            for kernel_grads in (False, True):
                args = (grad_f, out_x, gates, kernels.detach(), kernel_grads)
                torch.library.opcheck(phi_fused.scale_features_backward, args)
    mean, var = torch.rand(5, 4), torch.rand(5, 4)
    torch.library.opcheck(phi_mod.all_finite, (mean, var, "layer1"))
