"""The strength's schedule follows the optimizer's steps by itself: what counts as a step, and that a plain loop
with no call to the schedule trains the same network as train/target.py."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from timm_metaperturb import (
    add_regularizer,
    create_model,
    get_injection,
    get_regularizer,
    inject_metaperturb,
    set_perturb_strength,
)
from timm_metaperturb.injection import annealed_strength
from timm_metaperturb.training.data import Augmentation, EpochSampler, augment, seed_for
from timm_metaperturb.training.target import TargetConfig, build_model, prepare_data, train_target

X, Y = torch.randn(8, 3, 32, 32), torch.arange(8) % 4


def scheduled_conv4(phi, total_steps=10):
    torch.manual_seed(0)
    model = inject_metaperturb(timm.create_model("conv4", num_classes=4), phi, total_steps=total_steps)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, optimizer


def backward(model, x=X, y=Y):
    model.train()
    F.cross_entropy(model(x), y).backward()


def test_each_optimizer_step_advances_the_strength(phi):
    model, optimizer = scheduled_conv4(phi, total_steps=10)  # k rises over the first 4 steps
    injection = get_injection(model)
    seen = [injection.strength]
    for _ in range(6):
        backward(model)
        optimizer.step()
        optimizer.zero_grad()
        seen.append(injection.strength)
    assert seen == [annealed_strength(i, 10) for i in range(7)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert int(injection.steps_taken) == 6


def test_accumulation_several_forwards_and_evaluation_count_once(phi):
    model, optimizer = scheduled_conv4(phi)
    injection = get_injection(model)
    for chunk in X.split(2):  # gradient accumulation over 4 micro-batches
        backward(model, chunk, Y[: len(chunk)])
    model.eval()
    model(X)  # an evaluation between backward and step
    with torch.no_grad():
        model.train()(X)
    assert injection.strength == 0.0, "forwards and backwards alone take no step"
    optimizer.step()
    assert int(injection.steps_taken) == 1 and injection.strength == 0.25
    optimizer.zero_grad(set_to_none=True)
    optimizer.step()  # no gradient: no update of the network
    other = torch.nn.Linear(2, 2)
    other(torch.randn(1, 2)).sum().backward()
    torch.optim.SGD(other.parameters(), lr=0.1).step()  # another network's optimizer
    assert int(injection.steps_taken) == 1


def test_a_step_skipped_by_the_grad_scaler_is_not_counted(phi):
    model, optimizer = scheduled_conv4(phi)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    for overflow, taken in ((True, 0), (False, 1)):
        model.train()
        scaler.scale(F.cross_entropy(model(X), Y)).backward()
        if overflow:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        assert int(get_injection(model).steps_taken) == taken


def test_phi_steps_do_not_count_and_copies_count_their_own(phi):
    model = inject_metaperturb(timm.create_model("conv4", num_classes=4), phi, total_steps=10, train_phi=True)
    phi_optimizer = torch.optim.Adam(phi.parameters(), lr=1e-3)
    backward(model)
    phi_optimizer.step()  # meta-training's step on φ
    assert int(get_injection(model).steps_taken) == 0
    twin = copy.deepcopy(model)
    twin.zero_grad()
    backward(twin)
    torch.optim.SGD([p for n, p in twin.named_parameters() if "metaperturb" not in n], lr=1e-3).step()
    assert int(get_injection(twin).steps_taken) == 1 and int(get_injection(model).steps_taken) == 0


def test_a_classifier_replaced_after_injection_counts(phi):
    """Linear probing: the backbone frozen, the new classifier the only parameters updated."""
    model = inject_metaperturb(timm.create_model("resnet20", num_classes=10), phi, total_steps=10)
    model.reset_classifier(3)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("fc."))
    optimizer = torch.optim.SGD(model.fc.parameters(), lr=1e-3)
    backward(model, X, Y % 3)
    optimizer.step()
    assert int(get_injection(model).steps_taken) == 1


def test_compiled_training_counts_steps(phi):
    torch._dynamo.reset()
    model, optimizer = scheduled_conv4(phi)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        F.cross_entropy(compiled(X), Y).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert int(get_injection(model).steps_taken) == 2 and get_injection(model).strength == 0.5


def test_checkpoint_restores_the_schedule_and_fixed_strength_overrides(phi):
    model, optimizer = scheduled_conv4(phi)
    for _ in range(3):
        backward(model)
        optimizer.step()
    restored = inject_metaperturb(timm.create_model("conv4", num_classes=4), phi, total_steps=10)
    restored.load_state_dict(model.state_dict())
    assert get_injection(restored).strength == 0.75 and int(get_injection(restored).steps_taken) == 3
    set_perturb_strength(restored, 0.1)
    backward(restored)
    torch.optim.SGD(restored.parameters(), lr=1e-3).step()
    assert get_injection(restored).strength == 0.1, "a fixed strength stays fixed"
    with pytest.raises(ValueError, match="either a fixed strength or total_steps"):
        inject_metaperturb(timm.create_model("conv4"), phi, strength=0.5, total_steps=10)
    with pytest.raises(ValueError, match="positive number of optimizer steps"):
        create_model("conv4", metaperturb=True, phi=phi, total_steps=0)


def test_dropblock_schedule_follows_the_optimizer_too():
    model = add_regularizer(timm.create_model("conv4", num_classes=4), "dropblock", total_steps=4)
    dropblock = get_regularizer(model, "dropblock")
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    strengths = [dropblock.strength]
    for _ in range(5):
        backward(model)
        optimizer.step()
        strengths.append(dropblock.strength)
    assert strengths == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


@pytest.mark.filterwarnings("ignore:with φ.s noise the training loss")
def test_plain_loop_without_schedule_calls_trains_the_same_network_as_target(tmp_path, phi):
    """A user's loop that never sets the strength ends with the same weights as train/target.py's run; the same
    loop with the strength fixed at 1 does not."""
    phi.save_pretrained(tmp_path / "phi")
    cfg = TargetConfig(dataset="digits", max_per_class=10, test_rest=True, hflip=False, model="conv4", image_size=16,
                       batch_size=32, steps=12, eval_every=100, phi=str(tmp_path / "phi"), progress=False,
                       plots=False, output=str(tmp_path / "run"))  # fmt: skip
    train_target(cfg)
    target_weights = dict(timm.create_model("conv4", num_classes=10).named_parameters())
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))

    def plain_loop(fixed: bool) -> dict[str, torch.Tensor]:
        train, _ = prepare_data(cfg)
        torch.manual_seed(seed_for(cfg.seed, "model"))
        model, _ = build_model(cfg, len(train.class_names))  # the same network, φ and schedule as the run
        if fixed:
            set_perturb_strength(model, 1.0)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=5e-4)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [5, 8, 11], gamma=0.3)
        sampler = EpochSampler(len(train), cfg.batch_size, seed_for(cfg.seed, "batches"))
        aug = Augmentation(cfg.crop_padding, cfg.hflip)
        for _ in range(cfg.steps):
            model.train()
            idx = sampler.next()
            loss = F.cross_entropy(model(augment(train.images[idx], aug, sampler.generator)), train.labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        return {k: v for k, v in model.state_dict().items() if k in target_weights}

    plain = plain_loop(fixed=False)
    assert all(torch.equal(plain[k], saved[k]) for k in target_weights)
    fixed = plain_loop(fixed=True)
    assert not all(torch.equal(fixed[k], saved[k]) for k in target_weights)
