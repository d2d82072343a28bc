"""Target training: every method, annealing, metrics, outputs, fine-tuning, resuming, the comparison driver, bad
input."""

import copy
import json
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from timm_metaperturb import (
    create_model,
    get_injection,
    inject_metaperturb,
    recalibrate_batchnorm,
    set_eval_noise,
    set_perturb_strength,
)
from timm_metaperturb.regularizers import InformationDropout, ManifoldMixup, add_regularizer, get_regularizer
from timm_metaperturb.training.adversarial import adversarial_accuracy
from timm_metaperturb.training.checkpoints import STATE_FILE, save_checkpoint_file
from timm_metaperturb.training.corruptions import CORRUPTIONS, held_out_subset
from timm_metaperturb.training.data import Augmentation, ImageTensors
from timm_metaperturb.training.metrics import classification_metrics, expected_calibration_error
from timm_metaperturb.training.streaming import StreamedImages
from timm_metaperturb.training.target import (
    CHECKPOINT_DIR,
    TargetConfig,
    annealed_strength,
    build_model,
    evaluate_corrupted,
    evaluate_modes,
    prepare_data,
    train_target,
    training_loss_with_and_without_noise,
    unfit_warning,
)

TINY = dict(dataset="digits", max_per_class=10, test_rest=True, hflip=False, model="conv4", image_size=16,
            batch_size=32, steps=6, eval_every=3, eval_passes=2, final_passes=3, progress=False)  # fmt: skip


@pytest.fixture
def phi_dir(tmp_path, phi):
    phi.save_pretrained(tmp_path / "phi")
    return str(tmp_path / "phi")


@pytest.mark.parametrize(
    "method", ["metaperturb", "information_dropout", "dropblock", "manifold_mixup", "metaperturb+manifold_mixup"]
)
def test_each_method_changes_the_loss_and_trains(method, phi_dir):
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))

    def first_loss(method_name):
        torch.manual_seed(1)
        model, attached = build_model(TargetConfig(**{**TINY, "method": method_name, "phi": phi_dir}), 10)
        for owner in attached.values():
            owner.strength = 1.0
        model.train()
        torch.manual_seed(2)
        if "manifold_mixup" in attached:
            attached["manifold_mixup"].draw(16)
        return model, attached, F.cross_entropy(model(x), y)

    _, _, base_loss = first_loss("base")
    model, _, loss = first_loss(method)
    assert not torch.isclose(loss, base_loss), "the method must change the loss"
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        torch.manual_seed(3)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_channels_last_computes_the_same_network(tmp_path, phi_dir):
    cfg = {**TINY, "model": "resnet20", "phi": phi_dir}
    torch.manual_seed(0)
    default, _ = build_model(TargetConfig(**cfg), 10)
    torch.manual_seed(0)
    nhwc, _ = build_model(TargetConfig(**cfg, channels_last=True), 10)
    seen = []
    get_injection(nhwc).phi.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    first_conv = [next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d)).weight for net in (default, nhwc)]
    assert first_conv[0].is_contiguous() and first_conv[1].is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 16, 16)
    for model in (default, nhwc):
        set_eval_noise(model, "mean")
        model.eval()
    torch.testing.assert_close(nhwc(x), default(x), rtol=1e-4, atol=1e-5)
    assert seen and all(h.is_contiguous(memory_format=torch.channels_last) for h in seen), "φ must see NHWC maps"

    runs = [train_target(TargetConfig(**{**TINY, "phi": phi_dir, "channels_last": layout, "output": str(tmp_path / n)}))
            for n, layout in (("nchw", False), ("nhwc", True))]  # fmt: skip
    assert runs[1]["final"]["train_loss"] == pytest.approx(runs[0]["final"]["train_loss"], rel=1e-3)
    weights = [timm_state(tmp_path / n / "model.safetensors") for n in ("nchw", "nhwc")]
    assert weights[0].keys() == weights[1].keys()


def test_annealing_reaches_one_at_40_percent(tmp_path, phi_dir):
    assert annealed_strength(0, 1000, 0.4) == 0.0
    assert annealed_strength(200, 1000, 0.4) == 0.5
    assert annealed_strength(400, 1000, 0.4) == 1.0 and annealed_strength(900, 1000, 0.4) == 1.0
    run = train_target(TargetConfig(**{**TINY, "steps": 10, "phi": phi_dir, "output": str(tmp_path / "run")}))
    assert run["strength_at"] == {"0%": 0.0, "20%": 0.5, "40%": 1.0, "100%": 1.0}


def test_ece_against_a_hand_computed_case():
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    labels = torch.tensor([0, 1, 0, 1])
    # bins: {0.9: two examples, accuracy 1/2}, {0.6: one, correct}, {0.8: one, correct}
    expected = 2 / 4 * abs(0.5 - 0.9) + 1 / 4 * abs(1 - 0.6) + 1 / 4 * abs(1 - 0.8)
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)
    metrics = classification_metrics(probs, labels)
    assert metrics["accuracy"] == 75.0 and metrics["ece"] == pytest.approx(100 * expected)
    assert metrics["nll"] == pytest.approx(float(-torch.log(torch.tensor([0.9, 0.1, 0.6, 0.8])).mean()))


def test_manifold_mixup_mixes_one_site_and_the_targets_with_the_same_lambda():
    model = timm.create_model("resnet20")
    assert add_regularizer(model, "manifold_mixup") is model
    mixup = get_regularizer(model, "manifold_mixup")
    assert isinstance(mixup, ManifoldMixup) and len(mixup.site_list) == 9
    torch.manual_seed(0)
    layers = {mixup.draw(8)[0] for _ in range(200)}
    assert layers == set(range(10)), "the input and every site get picked"
    layer, lam, perm = mixup.draw(8)
    while layer == 0:
        layer, lam, perm = mixup.draw(8)
    h = torch.randn(8, 16, 4, 4)
    site = mixup.site_list[layer - 1]
    torch.testing.assert_close(mixup.perturb(site, h), lam * h + (1 - lam) * h[perm])
    other = mixup.site_list[layer % len(mixup.site_list)]
    assert torch.equal(mixup.perturb(other, h), h)
    logits, y = torch.randn(8, 10), torch.randint(0, 10, (8,))
    expected = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
    torch.testing.assert_close(mixup.task_loss(logits, y), expected)
    mixup.eval()
    assert torch.equal(mixup.perturb(site, h), h), "no mixing at eval"


def test_information_dropout_adds_its_kl_term_to_the_loss():
    model = add_regularizer(timm.create_model("resnet20"), "information_dropout", beta=0.5)
    info = get_regularizer(model, "information_dropout")
    assert isinstance(info, InformationDropout)
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(0)
    model.train()(x)
    kl = info.kl()
    assert kl > 0 and kl.requires_grad
    torch.manual_seed(0)
    model(x)  # the same forward again
    torch.testing.assert_close(info.extra_loss(), 0.5 * kl)
    assert info.kl() == 0, "kl() consumes the terms of the last forward"
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), model(x)) and info.kl() == 0, "deterministic at eval"


def test_run_writes_json_weights_and_plots(tmp_path, phi_dir):
    run = train_target(
        TargetConfig(**{**TINY, "phi": phi_dir, "eval_noise": "sample", "output": str(tmp_path / "run")})
    )
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["final"] == run["final"] and saved["final"]["passes"] == 3
    assert [h["step"] for h in saved["history"]] == [3, 6]
    assert {"accuracy", "nll", "ece"} <= set(saved["final"]) and saved["data"] == {
        "train": 100, "test": 1697, "classes": [str(d) for d in range(10)]}  # fmt: skip
    assert len(saved["scales"]) == 4 and all(0 < s < 1 for v in saved["scales"].values() for s in v)
    assert saved["threads"] == torch.get_num_threads() and "cores" in saved["machine"], "what reproduces it bit for bit"
    for name in ("convergence.png", "reliability.png", "scales.png"):
        assert (tmp_path / "run" / name).read_bytes()[:4] == b"\x89PNG"
    assert not any(k.startswith("metaperturb.") for k in timm_state(tmp_path / "run" / "model.safetensors"))


def test_final_evaluation_modes(tmp_path, phi_dir):
    """sample-N averages N sampled passes, 'mean' is one deterministic pass, 'mean-bn' the same after batch norm
    is re-estimated in that mode; the model is left as it was; a run reports every mode asked."""
    cfg = TargetConfig(**{**TINY, "phi": phi_dir, "final_modes": "3,1,mean,mean-bn", "output": str(tmp_path / "r")})
    run = train_target(cfg)
    assert set(run["evaluations"]) == {"sample-1", "sample-3", "mean", "mean-bn"}
    train, test = prepare_data(cfg)
    model, _ = build_model(cfg, len(train.class_names))
    set_perturb_strength(model, 1.0)  # as at the end of training (the schedule starts at 0)
    model.train()(torch.randn(32, 3, 16, 16) * 3)  # batch-norm statistics that the recalibration will replace
    before, mode = {k: v.clone() for k, v in model.state_dict().items()}, get_injection(model).mode.eval_noise
    aug = Augmentation(cfg.crop_padding, cfg.hflip)
    first, second = (evaluate_modes(model, test, aug, ["1", "3", "mean", "mean-bn"], train) for _ in range(2))
    assert first["mean"] == second["mean"] and first["mean-bn"] == second["mean-bn"], "deterministic"
    assert first["mean-bn"] != first["mean"], "the recalibrated statistics change the predictions"
    assert first["sample-1"] != second["sample-1"] and first["sample-1"] != first["sample-3"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the model is left as it was"
    assert get_injection(model).mode.eval_noise == mode
    baseline = train_target(TargetConfig(**{**cfg.__dict__, "method": "dropblock", "output": str(tmp_path / "b")}))
    assert set(baseline["evaluations"]) == {"final", "final-bn"}
    assert baseline["evaluations"]["final"].items() <= baseline["final"].items()


def test_corrupted_evaluation_is_the_default_evaluation_on_corrupted_copies(tmp_path, phi_dir, monkeypatch):
    """Clean, it equals the default evaluation (mean-bn; baselines final-bn) of the same test images; every type and
    severity is reported; the model is left as it was."""
    monkeypatch.setenv("TIMM_METAPERTURB_CACHE", str(tmp_path / "cache"))
    cfg = TargetConfig(**{**TINY, "phi": phi_dir, "image_size": 32, "classes": "0-3", "corruptions": 12,
                          "final_modes": "mean-bn", "output": str(tmp_path / "r")})  # fmt: skip
    run = train_target(cfg)
    assert run["corruptions"]["images"] == 12 and set(run["corruptions"]["corrupted"]) == set(CORRUPTIONS)
    assert all(
        set(by_severity) == {"1", "2", "3", "4", "5"} for by_severity in run["corruptions"]["corrupted"].values()
    )
    train, test = prepare_data(cfg)
    model, _ = build_model(cfg, len(train.class_names))
    set_perturb_strength(model, 1.0)
    model.train()(torch.randn(32, 3, 32, 32) * 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    aug = Augmentation(cfg.crop_padding, cfg.hflip)
    result = evaluate_corrupted(model, test, aug, train, 12)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the model is left as it was"
    keep = held_out_subset(12, len(test))
    subset = ImageTensors(test.images[keep], test.labels[keep], test.class_names)
    assert result["clean"] == evaluate_modes(model, subset, aug, ["mean-bn"], train)["mean-bn"]
    assert result["corrupted"]["gaussian_noise"]["5"] != result["clean"]
    baseline = train_target(TargetConfig(**{**cfg.__dict__, "method": "base", "output": str(tmp_path / "b")}))
    assert set(baseline["corruptions"]["corrupted"]) == set(CORRUPTIONS) and baseline["corruptions"]["images"] == 12
    with pytest.raises(ValueError, match="--loader memory"):
        evaluate_corrupted(model, StreamedImages.__new__(StreamedImages), aug, train, 12)


def test_mean_evaluation_re_estimates_batch_norm(tmp_path, phi_dir):
    cfg = {**TINY, "phi": phi_dir, "eval_noise": "mean", "final_modes": "mean,mean-bn", "output": str(tmp_path)}
    run = train_target(TargetConfig(**cfg))
    assert run["final"]["passes"] == 1
    assert run["evaluations"]["mean-bn"].items() <= run["final"].items()
    assert run["evaluations"]["mean"]["nll"] != run["final"]["nll"]


def _running_stats(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))}


@pytest.mark.parametrize("splits", [[512, 8], [130] * 4, [519, 1]])
def test_recalibration_does_not_depend_on_how_the_images_are_batched(phi, splits):
    """520 images give the same statistics as one batch or in any split, a last batch of 1 image included: each
    image counts once, whatever batch it is in (averaging per-batch statistics gave the 8 images of [512, 8] half
    the weight)."""
    torch.manual_seed(0)
    model = inject_metaperturb(timm.create_model("resnet20", num_classes=5), phi, input_size=(3, 16, 16))
    set_eval_noise(model, "mean")
    images = torch.randn(520, 3, 16, 16) * 1.5 + 0.3
    recalibrate_batchnorm(model, [images])
    whole = _running_stats(model)
    assert recalibrate_batchnorm(model, iter(images.split(splits))) == 19  # a one-shot iterator works too
    split = _running_stats(model)
    for key, value in whole.items():  # to float rounding: a batch of one image takes other convolution kernels
        torch.testing.assert_close(split[key], value, rtol=0, atol=1e-5 * value.abs().max().item(), msg=key)


def test_recalibration_gives_each_layer_the_statistics_of_its_input_over_all_images():
    """The first layer's statistics are its input's mean and unbiased variance over every image; a deeper layer's
    equal those of one batch of all images through batch norm in training mode."""
    torch.manual_seed(0)
    model = timm.create_model("conv4", num_classes=3)
    batches = [torch.randn(n, 3, 16, 16) * 2 + 1 for n in (70, 300, 1)]
    assert recalibrate_batchnorm(model, batches) == 4 and not model.training
    with torch.no_grad():
        features = model.blocks[0].conv(torch.cat(batches)).transpose(0, 1).flatten(1)
    torch.testing.assert_close(model.blocks[0].bn.running_mean, features.mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.blocks[0].bn.running_var, features.var(1), rtol=1e-5, atol=1e-6)
    assert model.blocks[0].bn.momentum == 0.1, "the layers' own momentum is kept"
    exact = _running_stats(model)
    reference = copy.deepcopy(model)  # the same weights
    for norm in (m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        norm.reset_running_stats()
        norm.momentum = None
    with torch.no_grad():
        reference.train()(torch.cat(batches))
    for key, value in _running_stats(reference).items():  # up to training mode's biased variance (1 / 1484 at 2x2)
        torch.testing.assert_close(exact[key], value, rtol=0, atol=2e-3 * value.abs().max().item(), msg=key)


def test_recalibration_needs_images():
    model = timm.create_model("conv4", num_classes=3)
    with pytest.raises(ValueError, match="at least one batch"):
        recalibrate_batchnorm(model, [])
    with pytest.raises(ValueError, match="pass more images"):
        recalibrate_batchnorm(timm.create_model("resnet20", num_classes=3), [torch.randn(1, 3, 4, 4)])


def test_set_eval_noise_mean_can_recalibrate_in_one_call(phi):
    model = inject_metaperturb(timm.create_model("conv4", num_classes=3), phi, input_size=(3, 16, 16))
    batch = torch.randn(8, 3, 16, 16) + 2
    set_eval_noise(model, "mean", recalibrate=[batch])
    assert get_injection(model).mode.eval_noise == "mean" and not model.training
    reference = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("blocks.") and "running" in k}
    assert all(v.abs().sum() > 0 for k, v in reference.items() if k.endswith("running_mean")), "re-estimated"
    recalibrate_batchnorm(model, [batch])  # the same statistics: φ ran deterministically both times
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())


def timm_state(path):
    from safetensors.torch import load_file

    return load_file(path)


def test_fine_tuning_loads_all_but_a_new_classifier(tmp_path):
    source = train_target(TargetConfig(**{**TINY, "method": "base", "output": str(tmp_path / "source")}))
    assert source["final"]["passes"] == 1
    folder = str(tmp_path / "source")  # the run's output folder, as a path or as timm's local-dir:
    model, _ = build_model(TargetConfig(**{**TINY, "method": "base", "init_from": folder}), num_classes=5)
    state = timm_state(tmp_path / "source" / "model.safetensors")
    again, _ = build_model(TargetConfig(**{**TINY, "method": "metaperturb", "init_from": f"local-dir:{folder}"}), 5)
    assert torch.equal(again.blocks[0].conv.weight, state["blocks.0.conv.weight"])
    assert torch.equal(model.blocks[0].conv.weight, state["blocks.0.conv.weight"])
    assert model.fc.weight.shape == (5, 64)
    mis_shaped = r"does not fit.*mis-shaped: blocks\.1\.conv\.weight: \(64, 64, 3, 3\) \(expected \(128, 64, 3, 3\)\)"
    with pytest.raises(ValueError, match=mis_shaped):
        build_model(TargetConfig(**{**TINY, "method": "base", "model": "vgg9", "init_from": folder}), 10)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"method": "dropout_of_my_own"}, "unknown method"),
        ({"method": "base+metaperturb"}, "do not combine"),
        ({"test_rest": False}, r"no 'test' split.*--val-fraction"),
        ({"model": "resnet_nonexistent"}, "unknown model"),
        ({"final_modes": "1,mc10"}, r"--final-modes \['mc10'\]"),
        ({"phi_components": "noise,dropout"}, "components must be a non-empty subset"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, changes, message):
    cfg = TargetConfig(**{**TINY, **changes, "output": str(tmp_path / "run")})
    with pytest.raises(ValueError, match=message):
        train_target(cfg)
    assert not (tmp_path / "run" / "run.json").exists()


TARGET = Path(__file__).parents[1] / "train" / "target.py"


def target_command(output: Path, phi_dir: str, *extra: str) -> list[str]:
    """train/target.py with the methods that keep state or draw from the global generator (φ's statistics and noise,
    DropBlock's ramp and masks), evaluations that sample in the middle of the run, and a checkpoint every 10 steps."""
    return [sys.executable, str(TARGET), "--dataset", "digits", "--max-per-class", "10", "--val-fraction", "0.1",
            "--no-hflip", "--model", "conv4", "--image-size", "16", "--batch-size", "32", "--steps", "40",
            "--eval-every", "20", "--eval-noise", "sample", "--eval-passes", "2", "--final-passes", "2", "--method",
            "metaperturb+dropblock", "--phi", phi_dir, "--checkpoint-every", "10", "--no-plots", "--no-progress",
            "--output", str(output), *extra]  # fmt: skip


def test_options_without_a_dataset_change_the_default_job(tmp_path, monkeypatch):
    """`train/target.py --method base` is the default job (digits, 20 per class, the rest as test) with base; with
    --dataset a run starts from the reference recipe; the output folder is named after dataset and method."""
    from train.target import job_arguments, main, parse_args

    monkeypatch.chdir(tmp_path)
    run = main(["--method", "base", "--model", "conv4", "--image-size", "16", "--steps", "2", "--eval-every", "2",
                "--no-plots", "--no-progress"])  # fmt: skip
    config = run["config"]
    assert (config["dataset"], config["max_per_class"], config["test_rest"], config["method"]) == (
        "digits", 20, True, "base")  # fmt: skip
    assert run["data"] == {"train": 200, "test": 1597, "classes": [str(c) for c in range(10)]}
    assert (tmp_path / "outputs" / "digits-base" / "run.json").is_file()
    assert run["command"].startswith("python train/target.py --dataset digits --max-per-class 20")
    assert parse_args(job_arguments(["--dataset", "fashion_mnist"])).steps == 10_000
    assert parse_args(job_arguments(["--dataset=fashion_mnist"])).max_per_class is None
    assert parse_args(job_arguments(["--data", "fashion_mnist"])).max_per_class is None  # argparse's abbreviation
    hub = TargetConfig(dataset="someone/flowers", method="metaperturb+dropblock")
    assert hub.output_dir() == Path("outputs/flowers-metaperturb+dropblock")


def test_a_killed_run_resumes_to_the_uninterrupted_network(tmp_path, phi_dir):
    """Killed without warning (SIGKILL: nothing is saved on the way out) after a checkpoint, then started again
    with --resume: the run continues from the checkpoint and ends with the network, metrics and history of a
    run that was never interrupted."""
    subprocess.run(target_command(tmp_path / "whole", phi_dir), check=True, capture_output=True)
    cut = tmp_path / "cut"
    checkpoint = cut / CHECKPOINT_DIR / STATE_FILE
    job = subprocess.Popen(target_command(cut, phi_dir), stdout=subprocess.DEVNULL)
    while not checkpoint.is_file() and job.poll() is None:
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert checkpoint.is_file() and not (cut / "run.json").exists(), "killed after its first checkpoint, mid-run"
    step = torch.load(checkpoint, weights_only=True)["step"]
    assert 10 <= step < 40
    resumed = subprocess.run(target_command(cut, phi_dir, "--resume"), check=True, capture_output=True, text=True)
    assert "resuming from" in resumed.stdout and not checkpoint.parent.exists(), "the checkpoint is removed once done"
    runs = [json.loads((tmp_path / name / "run.json").read_text()) for name in ("whole", "cut")]
    assert runs[0]["history"] == runs[1]["history"] and runs[0]["final"] == runs[1]["final"]
    whole, cut_state = (timm_state(tmp_path / name / "model.safetensors") for name in ("whole", "cut"))
    assert all(torch.equal(whole[k], cut_state[k]) for k in whole)


def test_resuming_with_other_settings_is_refused_and_keeps_the_checkpoint(tmp_path):
    cfg = TargetConfig(**{**TINY, "method": "base", "output": str(tmp_path / "run"), "resume": True})
    checkpoint = tmp_path / "run" / CHECKPOINT_DIR / STATE_FILE
    saved = {"config": asdict(replace(cfg, lr=0.1, final_modes="mean")), "step": 3}
    save_checkpoint_file(checkpoint.parent, STATE_FILE, saved)
    with pytest.raises(ValueError, match=r"other settings.*'lr': \(0.1, 0.001\).*start again"):
        train_target(cfg)
    assert checkpoint.is_file() and not (tmp_path / "run" / "run.json").exists()
    checkpoint.write_bytes(b"cut off while copying")
    with pytest.raises(ValueError, match=r"not a readable checkpoint.*delete it"):
        train_target(cfg)


def test_comparison_driver_tabulates_and_resumes(tmp_path):
    from train.compare import main

    args = ["--runs-dir", str(tmp_path / "runs"), "--methods", "base,dropblock", "--seeds", "0,1", "--workers", "2",
            "--", "--dataset", "digits", "--max-per-class", "5", "--test-rest", "--model", "conv4", "--image-size",
            "16", "--batch-size", "16", "--steps", "3", "--eval-every", "3"]  # fmt: skip
    table = main(args)
    assert "| base | " in table and "| dropblock | " in table and " ± " in table and table.count("| 2 |") == 2
    stamps = {p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("run.json")}
    assert len(stamps) == 4
    assert main(args) == table
    assert {p: p.stat().st_mtime for p in stamps} == stamps, "finished runs are not run again"


def test_driver_shares_the_cores_out_unless_omp_num_threads_is_set(monkeypatch):
    from train.compare import threads_per_run

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert [threads_per_run(workers) for workers in (1, 2, 3, 16)] == [8, 4, 2, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # another driver holds the other cores
    assert threads_per_run(1) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3,2")  # OpenMP's nested form: the first level is each run's
    assert threads_per_run(1) == 3
    for bad in ("four", "0", "-1"):
        monkeypatch.setenv("OMP_NUM_THREADS", bad)
        with pytest.raises(ValueError, match=f"OMP_NUM_THREADS='{bad}' is not a thread count"):
            threads_per_run(1)


def test_comparison_driver_reports_a_failed_run(tmp_path):
    from train.compare import main

    with pytest.raises(RuntimeError, match=r"--method no_such_method.*failed"):
        main(["--runs-dir", str(tmp_path), "--methods", "no_such_method", "--seeds", "0", "--", "--dataset", "digits"])
    assert not (tmp_path / "table.md").exists()


def test_training_loss_with_and_without_noise_leaves_the_model_as_it_was(tmp_path, phi_dir):
    cfg = TargetConfig(**{**TINY, "phi": phi_dir})
    train, _ = prepare_data(cfg)
    model, _ = build_model(cfg, len(train.class_names))
    set_perturb_strength(model, 0.3)
    before, rng = {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()
    aug = Augmentation(cfg.crop_padding, cfg.hflip)
    losses = training_loss_with_and_without_noise(model, train, aug, cfg.batch_size)
    assert losses["noise"] != losses["expected"] and losses == training_loss_with_and_without_noise(
        model, train, aug, cfg.batch_size
    ), "φ's noise changes the loss; the random state is restored, so a second call repeats it"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "statistics restored"
    assert torch.equal(torch.get_rng_state(), rng) and get_injection(model).strength == 0.3
    assert get_injection(model).mode.eval_noise == cfg.eval_noise


def test_a_run_that_ends_far_from_fitting_warns_what_to_do(tmp_path, phi_dir):
    assert unfit_warning({"noise": 0.21, "expected": 0.14}) is None, "the shipped φ on devanagari: it fits"
    with pytest.warns(UserWarning, match="the noise may be too strong .* --method base") as caught:
        run = train_target(TargetConfig(**{**TINY, "phi": phi_dir, "output": str(tmp_path / "r")}))
    assert run["train_loss_phi"]["noise"] > 0.5, "6 steps: far from fitting"
    assert (
        run["warnings"] == [str(caught[0].message)]
        and f"{run['train_loss_phi']['noise']:.2f} nats" in run["warnings"][0]
    )
    assert json.loads((tmp_path / "r" / "run.json").read_text())["warnings"] == run["warnings"]


def test_adversarial_accuracy_starts_at_the_default_evaluation_and_falls_with_eps(tmp_path, phi_dir):
    pytest.importorskip("torchattacks", reason="pip install --no-deps torchattacks==3.5.1 (CI does)")
    cfg = TargetConfig(**{**TINY, "phi": phi_dir, "steps": 40, "adversarial": 48, "output": str(tmp_path / "r")})
    run = train_target(cfg)
    assert set(run["adversarial"]["accuracy"]) == {"0", "1/255", "2/255", "4/255", "8/255"}
    model = create_model(f"local-dir:{tmp_path / 'r'}", pretrained=True)
    train, test = prepare_data(cfg)
    aug = Augmentation(cfg.crop_padding, cfg.hflip)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weak, strong = (adversarial_accuracy(model, test, aug, train, 48, (8 / 255,), steps=n) for n in (2, 10))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the model is left as it was"
    keep = held_out_subset(48, len(test))
    subset = ImageTensors(test.images[keep], test.labels[keep], test.class_names)
    clean = evaluate_modes(model, subset, aug, ["mean-bn"], train)["mean-bn"]["accuracy"]
    assert weak["accuracy"]["0"] == pytest.approx(clean) and clean > 30, "eps 0 is the default evaluation"
    assert strong["accuracy"]["8/255"] <= weak["accuracy"]["8/255"] < clean, "a stronger attack fools at least as many"
    base = create_model("conv4", num_classes=10, metaperturb=False)
    with pytest.raises(ValueError, match="eot=0"):
        adversarial_accuracy(base, test, aug, train, 16, eot=2)
