"""Injection into timm, torchvision and hand-written CNNs: where the sites go, what the model keeps."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from conftest import small_cnn

import timm_metaperturb as tm
from timm_metaperturb import (
    NoBlocksError,
    get_injection,
    inject_metaperturb,
    remove_metaperturb,
    set_eval_noise,
    set_perturb_strength,
)
from timm_metaperturb.injection import eval_noise_as
from timm_metaperturb.phi import RunMode, fused
from timm_metaperturb.regularizers import REGULARIZERS

# model -> (constructor, input size, number of sites, rule, (first site's name, target, position, call))
MODELS = {
    "resnet18": (lambda: timm.create_model("resnet18"), 64, 8, "group_matcher", ("layer1.0", "layer1.0.act2", "input", 1)),
    "resnet50": (lambda: timm.create_model("resnet50"), 64, 16, "group_matcher", ("layer1.0", "layer1.0.act3", "input", 1)),
    "efficientnet_b0": (lambda: timm.create_model("efficientnet_b0"), 64, 16, "group_matcher", ("blocks.0.0", "blocks.0.0", "output", 1)),
    "mobilenetv3_large_100": (lambda: timm.create_model("mobilenetv3_large_100"), 64, 16, "group_matcher", ("blocks.0.0", "blocks.0.0", "output", 1)),
    "convnext_atto": (lambda: timm.create_model("convnext_atto"), 64, 12, "group_matcher", ("stages.0.blocks.0", "stages.0.blocks.0", "output", 1)),
    "regnetx_002": (lambda: timm.create_model("regnetx_002"), 64, 13, "group_matcher", ("s1.b1", "s1.b1.act3", "input", 1)),
    "densenet121": (lambda: timm.create_model("densenet121"), 64, 58, "group_matcher", ("features.denseblock1.denselayer1", "features.denseblock1.denselayer1", "output", 1)),
    "inception_v3": (lambda: timm.create_model("inception_v3"), 107, 11, "group_matcher", ("Mixed_5b", "Mixed_5b", "output", 1)),
    "selecsls42b": (lambda: timm.create_model("selecsls42b"), 64, 6, "group_matcher", ("features.0", "features.0.conv6.2", "input", 1)),
    "mambaout_femto": (lambda: timm.create_model("mambaout_femto", depths=(2, 2, 2, 2)), 64, 8, "group_matcher", ("stages.0.blocks.0", "stages.0.blocks.0", "output", 1)),
    "hrnet_w18_small": (lambda: timm.create_model("hrnet_w18_small"), 64, 23, "block_classes", ("layer1.0", "layer1.0.act3", "input", 1)),
    "vgg11_bn": (lambda: timm.create_model("vgg11_bn"), 64, 8, "conv_runs", ("features.0", "features.2", "input", 1)),
    "torchvision_resnet18": (lambda: torchvision.models.resnet18(), 64, 8, "block_classes", ("layer1.0", "layer1.0.relu", "input", 2)),
    "torchvision_mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(), 64, 17, "block_classes", ("features.1", "features.1", "output", 1)),
    "torchvision_googlenet": (lambda: torchvision.models.googlenet(aux_logits=False, init_weights=False), 64, 9, "block_classes", ("inception3a", "inception3a", "output", 1)),
    "sequential_cnn": (small_cnn, 32, 2, "conv_runs", ("0", "2", "input", 1)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(MODELS))
def test_injection_into_every_family(name, phi):
    make, size, n_sites, rule, first = MODELS[name]
    torch.manual_seed(0)
    model = make()
    base_keys = list(model.state_dict())
    inject_metaperturb(model, phi, input_size=(3, size, size))
    sites = get_injection(model).site_list
    assert len(sites) == n_sites
    assert {s.rule for s in sites} == {rule}
    assert (sites[0].name, sites[0].target, sites[0].position, sites[0].call) == first

    keys = list(model.state_dict())
    assert keys[: len(base_keys)] == base_keys
    assert all(k.startswith("metaperturb.") for k in keys[len(base_keys) :])
    assert len([k for k in keys if k.startswith("metaperturb.phi.")]) == 6

    x = torch.randn(2, 3, size, size)
    model.train()
    model(x).logsumexp(1).sum().backward()
    assert all(p.grad is None for p in phi.parameters()), "φ is frozen by default"
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("metaperturb"))
    stats = get_injection(model).sites
    assert all(not torch.equal(s.running_mean, torch.zeros_like(s.running_mean)) for s in stats.values())
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_sites_perturb_what_they_claim(phi):
    """Each site changes the network's output, and only while injected."""
    torch.manual_seed(0)
    model = timm.create_model("resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    clean = model(x)
    inject_metaperturb(model, phi)
    assert not torch.allclose(model(x), clean)
    set_perturb_strength(model, 0.0)
    torch.testing.assert_close(model(x), clean)
    remove_metaperturb(model)
    assert not hasattr(model, "metaperturb")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(model(x), clean)


def test_torchvision_shared_relu_is_perturbed_on_its_closing_call_only(phi):
    """torchvision's BasicBlock runs one ReLU module twice: after bn1 and after the residual sum."""
    model = inject_metaperturb(torchvision.models.resnet18(), phi, input_size=(3, 64, 64)).eval()
    block = model.layer1[0]
    seen, bn = [], {}
    block.relu.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))  # runs after MetaPerturb's
    block.bn1.register_forward_hook(lambda m, args, out: bn.update(bn1=out.clone()))
    block.bn2.register_forward_hook(lambda m, args, out: bn.update(bn2=out.clone()))
    block.register_forward_pre_hook(lambda m, args: bn.update(x=args[0].clone()))
    model(torch.randn(2, 3, 64, 64))
    assert len(seen) == 2
    assert torch.equal(seen[0], bn["bn1"])  # untouched
    assert not torch.allclose(seen[1], bn["bn2"] + bn["x"])  # perturbed


def test_output_placement_is_selectable(phi):
    model = inject_metaperturb(timm.create_model("resnet18"), phi, placement="output", input_size=(3, 64, 64))
    assert all(s.position == "output" and s.target == s.name for s in get_injection(model).site_list)
    with pytest.raises(ValueError, match="placement must be one of"):
        inject_metaperturb(timm.create_model("resnet18"), phi, placement="middle")


def test_state_dict_round_trip_gives_identical_eval_outputs(phi):
    torch.manual_seed(0)
    trained = inject_metaperturb(timm.create_model("resnet20"), phi)
    opt = torch.optim.SGD([p for p in trained.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        trained(torch.randn(8, 3, 32, 32)).logsumexp(1).sum().backward()
        opt.step()
    fresh_phi = copy.deepcopy(phi)
    with torch.no_grad():
        for p in fresh_phi.parameters():
            p.zero_()
    fresh = inject_metaperturb(timm.create_model("resnet20"), fresh_phi)
    fresh.load_state_dict(trained.state_dict())
    x = torch.randn(4, 3, 32, 32)
    outputs = []
    for model in (trained.eval(), fresh.eval()):
        torch.manual_seed(7)
        outputs.append(model(x))
    assert torch.equal(outputs[0], outputs[1])
    assert torch.equal(
        fresh.metaperturb.sites["blocks_8"].running_var, trained.metaperturb.sites["blocks_8"].running_var
    )


@pytest.mark.parametrize("fused", [True, False], ids=["fused kernels", "torch operators"])
def test_single_pass_eval_compiles_to_one_graph(phi, fused):
    """torch.compile traces the deterministic eval through every site's hook without a graph break (fullgraph
    fails on one), φ's fused single pass kept in the graph as an operator or its torch operators traced, and the
    graph computes what eager does, φ included. Eager runs the same implementation as the graph: the fused CPU
    kernels round differently from torch operators, which this large φ amplifies through 9 sites."""
    torch._dynamo.reset()
    model = inject_metaperturb(timm.create_model("resnet20"), phi).eval()
    get_injection(model).mode = RunMode(fused_kernels=fused)
    set_eval_noise(model, "mean")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True, backend="eager")(x)
        eager = model(x)
        set_perturb_strength(model, 0.0)
        plain = model(x)
    torch.testing.assert_close(compiled, eager)
    assert not torch.allclose(compiled, plain), "φ acts in the compiled graph"


def test_training_compiles_to_one_graph_on_the_fused_kernels(phi):
    """In training too torch.compile keeps φ's fused operators in one graph (fullgraph: no break where φ draws a
    seed, checks its statistics or loads its kernels). Given the same seeds the compiled forward, its gradients
    and the running statistics are eager's, and a NaN raises φ's error from inside the graph."""
    if fused.cpu_kernels() is None:
        pytest.skip("φ's CPU kernels cannot be built here (no C++ compiler)")
    torch._dynamo.reset()
    eager = inject_metaperturb(timm.create_model("conv4"), phi).train()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # AOT autograd: fake shapes, gradients
    x = torch.randn(4, 3, 32, 32)
    results = []
    for net, forward in ((eager, eager), (model, compiled)):
        torch.manual_seed(1)
        out = forward(x)
        grads = torch.autograd.grad(out.square().sum(), [p for p in net.parameters() if p.requires_grad])
        results.append((out, *grads, net.metaperturb.sites["blocks_1"].running_var))
    for compiled_value, eager_value in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(compiled_value, eager_value)
    torch.manual_seed(2)
    assert not torch.allclose(compiled(x), results[0][0]), "a new seed, new noise"
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"site 'blocks.0'"):
        compiled(x)


def test_plain_checkpoint_loads_strictly_into_injected_model(phi):
    plain = timm.create_model("resnet18")
    model = inject_metaperturb(timm.create_model("resnet18"), phi, input_size=(3, 64, 64))
    before = {k: v.clone() for k, v in model.metaperturb.state_dict().items()}
    model.load_state_dict(plain.state_dict())  # strict
    assert all(torch.equal(v, model.metaperturb.state_dict()[k]) for k, v in before.items())
    assert torch.equal(model.conv1.weight, plain.conv1.weight)
    partial = model.state_dict()
    del partial["metaperturb.phi.scale_kernels"]
    with pytest.raises(RuntimeError, match=r"metaperturb.phi.scale_kernels"):
        model.load_state_dict(partial)


def test_deepcopy_carries_a_working_injection(phi):
    model = inject_metaperturb(timm.create_model("resnet20"), phi)
    clone = copy.deepcopy(model).train()
    clone(torch.randn(4, 3, 32, 32))
    assert not torch.equal(clone.metaperturb.sites["blocks_0"].running_mean, torch.zeros(16, 4))
    assert torch.equal(model.metaperturb.sites["blocks_0"].running_mean, torch.zeros(16, 4))


def test_phi_is_frozen_and_the_optimizer_leaves_it(phi):
    model = inject_metaperturb(timm.create_model("resnet20"), phi)
    before = copy.deepcopy(phi.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    opt.step()
    assert all(torch.equal(v, phi.state_dict()[k]) for k, v in before.items())
    assert {n for n, p in model.named_parameters() if p.requires_grad}.isdisjoint(
        {f"metaperturb.phi.{n}" for n, _ in phi.named_parameters()}
    )

    trainable = inject_metaperturb(timm.create_model("resnet20"), copy.deepcopy(phi), train_phi=True)
    trainable(torch.randn(4, 3, 32, 32)).logsumexp(1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.metaperturb.phi.parameters())


def test_strength_is_validated(phi):
    model = inject_metaperturb(timm.create_model("resnet20"), phi)
    set_perturb_strength(model, 0.25)
    assert model.metaperturb.strength == 0.25
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        set_perturb_strength(model, 1.5)
    with pytest.raises(ValueError, match="has no MetaPerturb"):
        set_perturb_strength(timm.create_model("resnet20"), 0.5)


def test_batch_of_one_in_training_uses_the_running_statistics(phi):
    """One image in training (batch norm frozen, as a user fine-tuning with batch size 1 would): φ's scale comes
    from the sites' running statistics, so the output is what evaluation with sampled noise gives."""
    model = inject_metaperturb(timm.create_model("resnet20"), phi)
    model.train()(torch.randn(8, 3, 32, 32))  # running statistics
    x = torch.randn(1, 3, 32, 32)
    torch.manual_seed(0)
    evaluated = model.eval()(x)
    model.train().apply(lambda m: m.eval() if isinstance(m, torch.nn.BatchNorm2d) else None)
    torch.manual_seed(0)
    torch.testing.assert_close(model(x), evaluated)


def test_bfloat16_autocast_follows_float32():
    """Under bfloat16 autocast the network's output and φ's gradients stay close to float32's (φ itself computes
    in float32; the same seed draws the same noise). The shipped φ: a realistic noise level."""
    model = inject_metaperturb(timm.create_model("resnet20"), train_phi=True).train()
    phi = get_injection(model).phi
    x = torch.randn(4, 3, 32, 32)
    outputs, grads = {}, {}
    for name, dtype in (("float32", None), ("bfloat16", torch.bfloat16)):
        model.zero_grad()
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = model(x)
        outputs[name] = out
        out.float().square().sum().backward()
        grads[name] = torch.cat([p.grad.flatten() for p in phi.parameters()])
    assert outputs["bfloat16"].dtype == torch.bfloat16
    full = outputs["float32"]
    torch.testing.assert_close(outputs["bfloat16"].float(), full, rtol=0.05, atol=0.05 * full.abs().max().item())
    cosine = F.cosine_similarity(grads["bfloat16"], grads["float32"], dim=0)
    assert cosine > 0.98, f"φ's gradient under bfloat16 points elsewhere (cosine {cosine:.3f})"


def test_nan_input_in_training_names_the_site(phi):
    model = inject_metaperturb(timm.create_model("conv4"), phi).train()
    x = torch.randn(4, 3, 32, 32)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"site 'blocks.0'"):
        model(x)


def test_user_given_blocks(phi):
    regex = inject_metaperturb(timm.create_model("resnet18"), phi, blocks=r"layer\d", input_size=(3, 64, 64))
    assert [s.name for s in get_injection(regex).site_list] == ["layer1", "layer2", "layer3", "layer4"]
    names = inject_metaperturb(timm.create_model("resnet18"), phi, blocks=["layer2.1"], input_size=(3, 64, 64))
    assert [s.target for s in get_injection(names).site_list] == ["layer2.1.act2"]
    from timm.models.resnet import Bottleneck

    types = inject_metaperturb(timm.create_model("resnet50"), phi, blocks=Bottleneck, input_size=(3, 64, 64))
    assert len(get_injection(types).site_list) == 16
    with pytest.raises(ValueError, match=r"does not have.*layer9"):
        inject_metaperturb(timm.create_model("resnet18"), phi, blocks=["layer9"])
    with pytest.raises(ValueError, match="contain other selected"):
        inject_metaperturb(timm.create_model("resnet18"), phi, blocks=["layer1", "layer1.0"])
    with pytest.raises(NoBlocksError, match="matched no module"):
        inject_metaperturb(timm.create_model("resnet18"), phi, blocks=r"nothing\d")


def test_subclass_of_a_torchvision_network_keeps_its_blocks(phi):
    class TinyResNet(torchvision.models.ResNet):  # a user's own variant
        def __init__(self) -> None:
            super().__init__(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=3)

    sites = get_injection(inject_metaperturb(TinyResNet(), phi, input_size=(3, 32, 32))).site_list
    assert [(s.name, s.rule) for s in sites] == [(f"layer{i}.0", "block_classes") for i in range(1, 5)]


def test_concatenating_blocks_are_perturbed_at_their_output(phi):
    """An Inception block's last activation closes only its last branch: φ goes on the concatenation."""
    sites = get_injection(inject_metaperturb(timm.create_model("inception_v4"), phi, input_size=(3, 75, 75))).site_list
    mixed = {s.name: s for s in sites if s.name in ("features.3", "features.4", "features.5")}
    assert [(s.target, s.position, s.channels) for s in mixed.values()] == [
        ("features.3", "output", 160),
        ("features.4", "output", 192),
        ("features.5", "output", 384),
    ]


class _AuxHeadNet(torch.nn.Module):
    """A hand-written network whose auxiliary head runs only in training, as GoogLeNet's does."""

    def __init__(self) -> None:
        super().__init__()
        conv = lambda c_in, c_out: torch.nn.Sequential(  # noqa: E731
            torch.nn.Conv2d(c_in, c_out, 3, padding=1), torch.nn.BatchNorm2d(c_out), torch.nn.ReLU()
        )
        self.body = torch.nn.Sequential(conv(3, 8), conv(8, 16))
        self.aux = torch.nn.Sequential(conv(16, 16))
        self.fc = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x)
        if self.training:
            x = x + self.aux(x)
        return self.fc(x.mean((2, 3)))


def test_blocks_the_forward_does_not_run_are_left_out(phi):
    sites = get_injection(inject_metaperturb(_AuxHeadNet(), phi, input_size=(3, 16, 16))).site_list
    assert [s.name for s in sites] == ["body.0", "body.1"]
    with pytest.raises(ValueError, match=r"'aux.0' of _AuxHeadNet did not run"):
        inject_metaperturb(_AuxHeadNet(), phi, blocks=["aux.0"], input_size=(3, 16, 16))


def test_hrnet_is_perturbed_after_its_residual_blocks_only(phi):
    """HRNet's group_matcher names no blocks; its residual blocks are, not its transition and fuse layers."""
    from timm.models.resnet import BasicBlock, Bottleneck

    model = timm.create_model("hrnet_w18_small")
    sites = get_injection(inject_metaperturb(model, phi, input_size=(3, 64, 64))).site_list
    modules = dict(model.named_modules())
    residual = [n for n, m in model.named_modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert [s.name for s in sites] == residual
    assert all(type(modules[s.target]).__name__ == "ReLU" and s.position == "input" for s in sites)


def test_hybrid_network_keeps_its_transformer_stage_unperturbed_with_a_warning(phi):
    model = timm.create_model("efficientformer_l1")
    with pytest.warns(UserWarning, match=r"leaves out 1 block\(s\) of EfficientFormer.*'stages.3'.*\(2, 49, 448\)"):
        inject_metaperturb(model, phi)
    assert [s.name for s in get_injection(model).site_list] == ["stages.0", "stages.1", "stages.2"]


class _ChannelsLastBlock(torch.nn.Module):
    """A (B, H, W, C) block, as MambaOut's: a residual Linear over the last dimension."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm, self.fc = torch.nn.LayerNorm(channels), torch.nn.Linear(channels, channels)

    def forward(self, x):
        return x + self.fc(self.norm(x))


class _ChannelsLastNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = torch.nn.Sequential(_ChannelsLastBlock(8), _ChannelsLastBlock(8))
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x).permute(0, 2, 3, 1)).mean((1, 2)))


def test_channels_last_maps_are_perturbed_per_channel(phi):
    model = inject_metaperturb(_ChannelsLastNet(), phi, blocks=r"blocks\.\d", input_size=(3, 6, 5))
    injection = get_injection(model)
    assert [(s.channels, s.channels_dim) for s in injection.site_list] == [(8, 3), (8, 3)]
    model.train()
    model(torch.randn(4, 3, 6, 5)).sum().backward()
    assert all(stats.running_mean.shape[0] == 8 for stats in injection.sites.values())

    set_eval_noise(model.eval(), "mean")
    x = torch.randn(3, 3, 6, 5)
    with torch.no_grad():
        h = model.stem(x).permute(0, 2, 3, 1)
        for site, block in zip(injection.site_list, model.blocks, strict=True):
            out = block.forward(h)  # without the hook
            h = injection.perturb(site, out.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # φ on (B, C, H, W)
        torch.testing.assert_close(model(x), model.head(h.mean((1, 2))))


def test_vit_gets_a_clear_error(phi):
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8)
    with pytest.raises(NoBlocksError, match=r"found no blocks.*patch_embed.proj.*blocks="):
        inject_metaperturb(vit, phi)
    with pytest.raises(ValueError, match=r"outputs \(2, 17, 192\), not a \(B, C, H, W\) feature map"):
        inject_metaperturb(vit, phi, blocks=r"blocks\.\d+", input_size=(3, 32, 32))


def test_model_without_convolutions_gets_a_clear_error(phi):
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(NoBlocksError, match="has no Conv2d layers"):
        inject_metaperturb(mlp, phi, input_size=(3, 2, 2))


def test_bad_arguments(phi):
    with pytest.raises(TypeError, match=r"needs a torch.nn.Module"):
        inject_metaperturb("resnet18", phi)
    with pytest.raises(ValueError, match=r"Pass input_size=\(C, H, W\)"):
        inject_metaperturb(small_cnn(), phi)  # built for 32x32, probed at the default 224x224
    model = inject_metaperturb(small_cnn(), phi, input_size=(3, 32, 32))
    with pytest.raises(ValueError, match="already has MetaPerturb"):
        inject_metaperturb(model, phi, input_size=(3, 32, 32))
    with pytest.raises(TypeError, match="phi= takes"):
        inject_metaperturb(small_cnn(), 3.0, input_size=(3, 32, 32))


def test_probe_leaves_model_state_and_rng_untouched(phi):
    model = timm.create_model("resnet20").train()
    model.blocks[0].eval()
    bn_before = model.blocks[0].bn1.running_mean.clone()
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    inject_metaperturb(model, phi)
    assert torch.equal(torch.rand(1), expected)
    assert model.training and not model.blocks[0].training and model.blocks[1].training
    assert torch.equal(model.blocks[0].bn1.running_mean, bn_before)


def test_models_sharing_one_phi_keep_their_own_evaluation(phi):
    """One φ in two networks: the other network's evaluation mode and train/eval flag leave this one's
    predictions as they were (φ is only read; what changes lives on each network's injection)."""
    torch.manual_seed(0)
    first, second = (inject_metaperturb(timm.create_model("resnet20", num_classes=3), phi) for _ in range(2))
    x = torch.randn(4, 3, 32, 32)
    first.train()(x), second.train()(x)  # running statistics for eval
    set_eval_noise(second.eval(), "mean")
    with torch.no_grad():
        before = second(x)
        set_eval_noise(first, "sample")
        first.train()
        assert torch.equal(second(x), before)
        set_eval_noise(first.eval(), "mean")
        set_eval_noise(second, "sample")
        assert not torch.equal(second(x), second(x)), "second samples again"
        assert torch.equal(first(x), first(x)), "first's own mode is deterministic"


def test_a_temporary_eval_noise_comes_back_after_an_error(phi):
    model = inject_metaperturb(timm.create_model("resnet20", num_classes=3), phi)
    with pytest.raises(RuntimeError, match="inside"), eval_noise_as(model, "mean"):
        assert get_injection(model).mode.eval_noise == "mean"
        raise RuntimeError("inside")
    assert get_injection(model).mode.eval_noise == "sample"
    with pytest.raises(ValueError, match="eval noise must be one of"):
        set_eval_noise(model, "median")


@pytest.mark.parametrize("name", sorted(REGULARIZERS))
def test_every_regularizer_attaches_and_removes_the_same_way(name, phi):
    """add_regularizer returns the model for every regularizer, MetaPerturb included; get_regularizer finds what
    was attached; remove_regularizer returns it and leaves the network's keys and outputs as before."""
    torch.manual_seed(0)
    model = timm.create_model("resnet20", num_classes=3).eval()
    plain_keys, x = list(model.state_dict()), torch.randn(2, 3, 32, 32)
    plain = model(x)
    options = {"phi": phi} if name == "metaperturb" else {}
    assert tm.add_regularizer(model, name, **options) is model
    owner = tm.get_regularizer(model, name)
    assert getattr(model, name) is owner and all(k in model.state_dict() for k in plain_keys)
    with pytest.raises(ValueError, match="already has"):
        tm.add_regularizer(model, name, **options)
    removed = tm.remove_regularizer(model, name)
    assert removed is (owner.phi if name == "metaperturb" else owner)
    assert list(model.state_dict()) == plain_keys and torch.equal(model(x), plain)
    with pytest.raises(ValueError, match=f'add_regularizer\\(model, "{name}"\\)'):
        tm.get_regularizer(model, name)


def test_probing_a_network_leaves_the_random_state(phi):
    """Attaching runs the network once on a dummy batch; with φ already attached and sampling, that pass must not
    change what a seeded run draws next."""
    model = inject_metaperturb(timm.create_model("resnet20"), phi)
    state = torch.get_rng_state()
    tm.add_regularizer(model, "dropblock")
    assert torch.equal(torch.get_rng_state(), state)
