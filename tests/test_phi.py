"""φ itself: its parameters, the formulas (against the authors' checkpoint), its statistics and bad input."""

import pytest
import torch
import torch.nn.functional as F
from conftest import strong_phi

from timm_metaperturb import MetaPerturb, load_official_checkpoint
from timm_metaperturb.phi import RunMode, SiteStatistics
from timm_metaperturb.phi.reference import reference_perturb
from timm_metaperturb.phi.torch_ops import draw_noise


def phi_from_authors_state(state: dict) -> MetaPerturb:
    """φ built from the authors' state dict by hand, independently of `load_official_checkpoint`."""
    phi = MetaPerturb()
    with torch.no_grad():
        for ours, theirs in [
            (phi.noise1.weight_self, "phi_1.w_identity"),
            (phi.noise1.weight_mean, "phi_1.w_all"),
            (phi.noise2.weight_self, "phi_2.w_identity"),
            (phi.noise2.weight_mean, "phi_2.w_all"),
            (phi.scale_kernels, "kernel"),
            (phi.scale_fc.weight, "fc.weight"),
        ]:
            ours.copy_(state[theirs].view_as(ours))
    return phi


def test_phi_has_82_parameters():
    phi = MetaPerturb()
    assert sum(p.numel() for p in phi.parameters()) == 82
    assert {n: tuple(p.shape) for n, p in phi.named_parameters()} == {
        "noise1.weight_self": (1, 1, 3, 3),
        "noise1.weight_mean": (1, 1, 3, 3),
        "noise2.weight_self": (1, 1, 3, 3),
        "noise2.weight_mean": (1, 1, 3, 3),
        "scale_kernels": (4, 1, 3, 3),
        "scale_fc.weight": (1, 10),
    }


def test_official_checkpoint_recomputed_from_the_formulas(official_phi_path):
    state = torch.load(official_phi_path, map_location="cpu", weights_only=True)
    phi = load_official_checkpoint(official_phi_path)
    torch.manual_seed(0)
    h, eps = torch.randn(8, 16, 12, 12) * 2, torch.randn(8, 16, 12, 12)
    stats = SiteStatistics(16, 4).train()

    out = phi(h, stats, strength=0.7, noise=eps)
    expected, (mean, var) = reference_perturb(phi_from_authors_state(state), h, eps, strength=0.7)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # running estimates: momentum 0.1 from (0, 1), unbiased variance
    torch.testing.assert_close(stats.running_mean, 0.1 * mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.running_var, 0.9 + 0.1 * var, rtol=1e-5, atol=1e-6)

    stats.eval()
    h2 = torch.randn(3, 16, 12, 12)
    out_eval = phi(h2, stats, noise=eps[:3])
    expected_eval, _ = reference_perturb(
        phi_from_authors_state(state), h2, eps[:3], (stats.running_mean, stats.running_var)
    )
    torch.testing.assert_close(out_eval, expected_eval, rtol=1e-5, atol=1e-5)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("noise", ["given", "drawn, kept", "drawn, redrawn"])
def test_fast_phi_equals_reference_forward_and_gradients(layout, strength, noise, device, monkeypatch):
    """The fast φ on torch operators (channels-last, custom backward, recomputation) against the formulas with
    autograd: output, running statistics and the gradients to h and to all 82 parameters, with some outputs
    clipped; eps given, or drawn by φ from a seed and either kept for the backward or drawn again there. (The
    fused kernels: test_phi_fused.py.)"""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # exact float32 convolutions on a GPU
    phi = strong_phi(clip=3.0).to(device)
    mode = RunMode(fused_kernels=False, redraw_noise=noise == "drawn, redrawn")
    h = (torch.randn(6, 5, 9, 9, device=device) * 2).contiguous(memory_format=layout).requires_grad_()
    eps, grad_out = torch.randn(6, 5, 9, 9, device=device), torch.randn(6, 5, 9, 9, device=device)
    stats = SiteStatistics(5, 4).to(device).train()

    if noise == "given":
        out = phi(h, stats, strength=strength, noise=eps, mode=mode)
    else:  # the same seed again gives the eps φ drew
        torch.manual_seed(7)
        out = phi(h, stats, strength=strength, mode=mode)
        torch.manual_seed(7)
        eps = draw_noise(int(torch.randint(2**62, ()).item()), h)
    expected, (mean, _) = reference_perturb(phi, h, eps, strength=strength)
    assert (expected >= 3.0).any() and (expected < 3.0).any()
    assert out.is_contiguous(memory_format=layout)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.running_mean, 0.1 * mean, rtol=1e-5, atol=1e-6)
    inputs = [h, *phi.parameters()]
    fast_grads, reference_grads = (torch.autograd.grad(y, inputs, grad_out) for y in (out, expected))
    for fast, ref in zip(fast_grads, reference_grads, strict=True):
        assert fast.shape == ref.shape and fast.abs().sum() > 0
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_fast_phi_equals_reference_at_eval_with_running_statistics():
    phi = strong_phi()
    stats = SiteStatistics(5, 4).eval()
    stats.running_mean.uniform_(0, 1)
    stats.running_var.uniform_(0.5, 2)
    h = torch.randn(3, 5, 7, 7, requires_grad=True)
    eps = torch.randn(3, 5, 7, 7)
    out = phi.eval()(h, stats, noise=eps)
    expected, _ = reference_perturb(phi, h, eps, (stats.running_mean, stats.running_var))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(out.sum(), h)
    torch.testing.assert_close(grad, torch.autograd.grad(expected.sum(), h)[0], rtol=1e-5, atol=1e-5)


def test_official_checkpoint_with_wrong_keys_fails(tmp_path, official_phi_path):
    state = torch.load(official_phi_path, map_location="cpu", weights_only=True)
    del state["kernel"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"missing.*kernel"):
        load_official_checkpoint(tmp_path / "broken.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not a state dict"):
        load_official_checkpoint(tmp_path / "list.pth")


def test_noise_mean_and_scale_are_channel_permutation_equivariant(phi):
    torch.manual_seed(1)
    h = torch.randn(4, 10, 9, 9)
    perm = torch.randperm(10)
    torch.testing.assert_close(phi.noise_logits(h[:, perm]), phi.noise_logits(h)[:, perm], rtol=1e-5, atol=1e-6)
    mean, var = phi.channel_statistics(h, None)
    mean_p, var_p = phi.channel_statistics(h[:, perm], None)
    torch.testing.assert_close(phi.scale(mean_p, var_p, 9), phi.scale(mean, var, 9)[perm])


def test_noise_is_softplus_of_unit_gaussian(phi):
    """With s = 1/2 (fc zeroed) and h = 1, the output is m = softplus(a + eps) / 2: inverting it recovers
    eps, which must be standard normal."""
    torch.manual_seed(2)
    with torch.no_grad():
        phi.scale_fc.weight.zero_()
    h = torch.ones(8, 3, 64, 64)
    m = phi(h, None)
    eps = torch.log(torch.expm1(2 * m)) - phi.noise_logits(h)
    assert abs(eps.mean().item()) < 0.01 and abs(eps.std().item() - 1) < 0.01


def test_strength_zero_is_identity_below_clip(phi):
    h = torch.randn(4, 5, 6, 6)
    torch.testing.assert_close(phi(h, None, strength=0.0), h)


def test_output_is_clipped(phi):
    h = torch.full((2, 3, 4, 4), 1e4)
    assert phi(h, None).max() <= phi.clip


def test_batch_of_one_uses_running_statistics(phi):
    stats = SiteStatistics(5, 4).train()
    before = stats.running_mean.clone(), stats.running_var.clone()
    eps = torch.randn(1, 5, 6, 6)
    h = torch.randn(1, 5, 6, 6)
    out = phi(h, stats, noise=eps)
    assert torch.equal(stats.running_mean, before[0]) and torch.equal(stats.running_var, before[1])
    torch.testing.assert_close(out, phi(h, stats.eval(), noise=eps))
    with pytest.raises(ValueError, match="batch of 1"):
        phi(h, None)


def test_non_finite_input_in_training_fails_and_keeps_statistics(phi):
    stats = SiteStatistics(5, 4).train()
    h = torch.randn(4, 5, 6, 6)
    h[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"site 'layer1'.*non-finite"):
        phi(h, stats, site="layer1")
    assert torch.equal(stats.running_mean, torch.zeros(5, 4)) and torch.equal(stats.running_var, torch.ones(5, 4))


@pytest.mark.parametrize("shape", [(4, 1, 8, 8), (4, 7, 1, 1), (2, 1, 1, 1)])
def test_one_channel_and_1x1_maps_follow_the_formulas(phi, shape):
    stats, eps, h = SiteStatistics(shape[1], 4).train(), torch.randn(shape), torch.randn(shape)
    out = phi(h, stats, noise=eps)
    expected, _ = reference_perturb(phi, h, eps)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    at_eval, _ = reference_perturb(phi, h, eps, mean_var=(stats.running_mean, stats.running_var))
    torch.testing.assert_close(phi(h, stats.eval(), noise=eps), at_eval, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_compute_in_float32(phi, dtype):
    h = torch.randn(4, 6, 8, 8)
    eps = torch.randn(4, 6, 8, 8)
    out = phi(h.to(dtype), None, noise=eps)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), phi(h.to(dtype).float(), None, noise=eps), rtol=1e-2, atol=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = phi(h, None, noise=eps)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, phi(h, None, noise=eps))


def test_phi_with_half_precision_weights_follows_float32(phi):
    half = MetaPerturb().half()
    half.load_state_dict(phi.state_dict())
    h, eps = torch.randn(4, 6, 8, 8), torch.randn(4, 6, 8, 8)
    out = half(h.half(), None, noise=eps)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), phi(h, None, noise=eps), rtol=1e-2, atol=1e-2)


def test_not_a_feature_map_fails(phi):
    with pytest.raises(ValueError, match="4-D"):
        phi(torch.randn(4, 10), None)


def test_expected_softplus_is_accurate():
    import numpy as np

    from timm_metaperturb.phi import expected_softplus

    a = torch.linspace(-20, 20, 20001, dtype=torch.float64)
    nodes, weights = np.polynomial.hermite.hermgauss(200)
    exact = np.logaddexp(0, a.numpy()[:, None] + np.sqrt(2) * nodes[None, :]) @ weights / np.sqrt(np.pi)
    assert (expected_softplus(a) - torch.from_numpy(exact)).abs().max() < 1e-6
    torch.manual_seed(0)
    samples = F.softplus(torch.tensor([-3.0, 0.0, 2.5])[:, None] + torch.randn(3, 200_000)).mean(1)
    torch.testing.assert_close(expected_softplus(torch.tensor([-3.0, 0.0, 2.5])), samples, atol=5e-3, rtol=0)


def test_mean_eval_noise_is_deterministic_and_the_average_of_sampled_passes(phi):
    stats = SiteStatistics(6, 4).train()
    phi(torch.randn(8, 6, 5, 5), stats)  # running statistics for eval
    stats.eval()
    phi.eval()
    h = torch.rand(4, 6, 5, 5)
    torch.manual_seed(0)
    sampled = torch.stack([phi(h, stats) for _ in range(1000)]).mean(0)
    mean = RunMode(eval_noise="mean")
    single = phi(h, stats, mode=mean)
    assert torch.equal(single, phi(h, stats, mode=mean))
    torch.testing.assert_close(single, sampled, atol=5e-2, rtol=0)  # 5 standard errors
    phi.train()
    assert not torch.equal(phi(h, stats, mode=mean), phi(h, stats, mode=mean)), "training still samples"
    assert torch.equal(phi(h, stats, mode=mean, training=False), single), "the caller's flag decides"


def test_components_ablations_fix_the_other_factor_to_one():
    """Without the scale, m = (softplus(a + eps) - 1) k + 1 and the statistics stay untouched; without the noise,
    m = (s - 1) k + 1: deterministic."""
    phi = strong_phi()
    h, eps = torch.randn(4, 5, 7, 7), torch.randn(4, 5, 7, 7)
    stats = SiteStatistics(5, 4).train()
    noise_only = RunMode(components=("noise",))
    z = F.softplus(phi.noise_logits(h) + eps)
    out = phi(h, stats, strength=0.5, noise=eps, mode=noise_only)
    torch.testing.assert_close(out, h * ((z - 1) * 0.5 + 1), rtol=1e-5, atol=1e-5)
    assert (stats.running_mean == 0).all() and (stats.running_var == 1).all()

    scale_only = RunMode(components=["scale"])
    _, (mean, var) = reference_perturb(phi, h, eps)
    s = phi.scale(mean, var, 7).view(1, -1, 1, 1)
    out = phi(h, stats, strength=0.5, mode=scale_only)
    torch.testing.assert_close(out, h * ((s - 1) * 0.5 + 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, phi(h, stats, strength=0.5, mode=scale_only))
    for wrong in [(), ("noise", "dropout")]:
        with pytest.raises(ValueError, match="non-empty subset"):
            RunMode(components=wrong)


def test_phi_outputs_match_stored_values():
    """A fixed φ on a fixed map, against numbers stored when φ's code was last changed on purpose: a training step's
    running statistics and the deterministic evaluation. Every implementation may change together and still pass
    the reference comparisons; this catches that."""
    phi = MetaPerturb()
    with torch.no_grad():
        for i, p in enumerate(phi.parameters()):
            p.copy_(torch.linspace(-0.5, 0.5, p.numel()).reshape(p.shape) * (1 + 0.3 * i))
    h = torch.sin(torch.arange(2 * 5 * 6 * 6, dtype=torch.float32)).reshape(2, 5, 6, 6) * 2
    stats = SiteStatistics(5, 4).train()
    phi.train()(h, stats, strength=0.7)
    out = phi.eval()(h, stats.eval(), strength=0.7, mode=RunMode(eval_noise="mean"))
    stored = torch.tensor([1.6667860746383667, 18.181171417236328, -67.52020263671875, 385.58795166015625])
    got = torch.stack([stats.running_mean.sum(), stats.running_var.sum(), out.sum(), out.abs().sum()])
    torch.testing.assert_close(got, stored, rtol=1e-5, atol=1e-5)
    stored_values = torch.tensor([0.0, -1.7211558818817139, 0.7842593789100647, 0.6971134543418884])
    torch.testing.assert_close(out.flatten()[[0, 37, 101, 359]], stored_values, rtol=1e-5, atol=1e-5)
