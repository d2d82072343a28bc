"""Meta-training end to end: real `accelerate launch` with 2 CPU processes, resume, bad input."""

import json
import socket

import pytest
import torch
from conftest import run_python
from test_data import make_image_folder

from timm_metaperturb import MetaPerturb
from timm_metaperturb.training.meta import MetaTrainConfig, collapse_warning, initial_phi

TINY = ["--model", "conv4", "--image-size", "16", "--batch-size", "8", "--groups", "2", "--log-every", "1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _phi(folder) -> dict:
    return MetaPerturb.from_pretrained(folder / "phi").state_dict()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return str(make_image_folder(tmp_path_factory.mktemp("data") / "images"))


def test_two_processes_match_one(tmp_path, images):
    common = ["--dataset", images, *TINY, "--steps", "3"]
    single = run_python(["train/meta.py", *common, "--output", tmp_path / "one"])
    assert single.returncode == 0, single.stderr
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", _free_port()]  # fmt: skip
    double = run_python([*launch, "train/meta.py", "--cpu", *common, "--output", tmp_path / "two"])
    assert double.returncode == 0, double.stderr

    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["world_size"] == 2 and run["phi_identical_across_processes"] is True
    assert json.loads((tmp_path / "one" / "run.json").read_text())["world_size"] == 1
    one, two = _phi(tmp_path / "one"), _phi(tmp_path / "two")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
    start = initial_phi(MetaTrainConfig(image_size=16)).state_dict()
    moved = max((one[k] - start[k]).abs().max().item() for k in one)
    assert 1e-4 < moved, f"φ moved only {moved:.1e} from where meta-training started"
    assert len(run["history"]) == 3 and len(run["history"][0]["tasks"]) == 4


def test_resume_ends_with_the_uninterrupted_phi(tmp_path, images):
    common = ["--dataset", images, *TINY, "--steps", "4", "--checkpoint-every", "2"]
    full = run_python(["train/meta.py", *common, "--output", tmp_path / "full"])
    assert full.returncode == 0, full.stderr
    checkpoint = tmp_path / "full" / "checkpoints" / "step_2"
    assert sorted(p.name for p in checkpoint.glob("task_*.pt")) == [f"task_{i}.pt" for i in range(4)]
    resumed = run_python(["train/meta.py", *common, "--output", tmp_path / "resumed", "--resume-from", checkpoint])
    assert resumed.returncode == 0, resumed.stderr
    a, b = _phi(tmp_path / "full"), _phi(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a), "resuming must give the same φ, bit for bit"
    history = json.loads((tmp_path / "resumed" / "run.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4]

    short = run_python(["train/meta.py", *common[:-4], "--steps", "2", "--checkpoint-every", "2", "--output",
                        tmp_path / "short"])  # fmt: skip
    assert short.returncode == 0, short.stderr
    short_end = tmp_path / "short" / "checkpoints" / "step_2"
    state = torch.load(short_end / "state.pt", weights_only=True)
    assert 0 < state["elapsed"] <= json.loads((tmp_path / "short" / "run.json").read_text())["wall_time_s"]
    torch.save({**state, "elapsed": 3600.0}, short_end / "state.pt")  # as if the first part had taken an hour
    longer = [*common, "--output", tmp_path / "longer", "--resume-from", short_end]
    assert run_python(["train/meta.py", *longer]).returncode == 0
    c = _phi(tmp_path / "longer")
    assert all(torch.equal(a[k], c[k]) for k in a), "a finished run resumed with more steps is that longer run"
    assert json.loads((tmp_path / "longer" / "run.json").read_text())["wall_time_s"] > 3600, "wall time of both parts"
    too_short = run_python(["train/meta.py", *common[:-4], "--steps", "1", "--output", tmp_path / "y",
                            "--resume-from", checkpoint])  # fmt: skip
    assert too_short.returncode != 0 and "past --steps 1" in too_short.stderr

    other_seed = [*common, "--seed", "5", "--output", tmp_path / "x", "--resume-from", checkpoint]
    changed = run_python(["train/meta.py", *other_seed])
    assert changed.returncode != 0 and "other settings" in changed.stderr and "'seed': (0, 5)" in changed.stderr


def test_phi_scale_lr_sets_the_scale_functions_rate_alone(tmp_path, images):
    run = run_python(["train/meta.py", "--dataset", images, *TINY, "--steps", "3", "--phi-scale-lr", "0",
                      "--output", tmp_path / "out"])  # fmt: skip
    assert run.returncode == 0, run.stderr
    phi, start = _phi(tmp_path / "out"), initial_phi(MetaTrainConfig(image_size=16)).state_dict()
    noise = [k for k in phi if MetaPerturb().is_noise_parameter(k)]
    assert noise and all(torch.equal(phi[k], start[k]) for k in phi if k not in noise), "scale lr 0: scale unmoved"
    assert max((phi[k] - start[k]).abs().max().item() for k in noise) > 1e-4, "the noise generator still learns"


def test_init_phi_starts_from_that_phi_and_refuses_one_made_otherwise(tmp_path, images):
    first = run_python(["train/meta.py", "--dataset", images, *TINY, "--steps", "2", "--output", tmp_path / "a"])
    assert first.returncode == 0, first.stderr
    cfg = MetaTrainConfig(image_size=16, init_phi=str(tmp_path / "a" / "phi"))
    start, fresh = initial_phi(cfg).state_dict(), initial_phi(MetaTrainConfig(image_size=16)).state_dict()
    made = _phi(tmp_path / "a")
    assert all(torch.equal(start[k], made[k]) for k in made)
    assert not torch.equal(start["scale_fc.weight"], fresh["scale_fc.weight"])
    go_on = run_python(["train/meta.py", "--dataset", images, *TINY, "--steps", "1", "--phi-scale-lr", "0",
                        "--init-phi", tmp_path / "a" / "phi", "--output", tmp_path / "b"])  # fmt: skip
    assert go_on.returncode == 0, go_on.stderr
    after = _phi(tmp_path / "b")
    assert all(torch.equal(after[k], made[k]) for k in made if not MetaPerturb().is_noise_parameter(k))
    assert "meta-training started from the φ" in (tmp_path / "b" / "phi" / "README.md").read_text()

    other = run_python(["train/meta.py", "--dataset", images, *TINY, "--steps", "1", "--image-size", "32",
                        "--init-phi", tmp_path / "a" / "phi", "--output", tmp_path / "c"])  # fmt: skip
    assert other.returncode != 0 and "'spatial_norm': (16.0, 32.0)" in other.stderr


def test_train_per_class_meta_trains_on_that_many_images(tmp_path, images):
    from accelerate import Accelerator

    from timm_metaperturb.training.meta import meta_train
    from train.meta import parse_args

    out = tmp_path / "scarce"
    cfg = parse_args(["--dataset", images, *TINY, "--steps", "1", "--train-per-class", "5", "--output", str(out)])
    meta_train(cfg, Accelerator(cpu=True))
    tasks = json.loads((out / "run.json").read_text())["tasks"]
    assert [t["train"] for t in tasks] == [5 * len(t["classes"]) for t in tasks]
    assert [t["val"] for t in tasks] == [12 * len(t["classes"]) for t in tasks], "validation halves stay whole"
    assert "| training images per class in each task (at most) | 5 |" in (out / "phi" / "README.md").read_text()


def test_channels_last_meta_trains_the_same_phi(tmp_path, images):
    from accelerate import Accelerator

    from timm_metaperturb.training.meta import meta_train
    from train.meta import parse_args

    layouts = []

    def record(module, args):
        if isinstance(module, MetaPerturb):
            layouts.append(args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous())

    phis = {}
    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        for name, flags in (("nchw", []), ("nhwc", ["--channels-last"])):
            cfg = parse_args(["--dataset", images, *TINY, "--steps", "2", "--output", str(tmp_path / name), *flags])
            meta_train(cfg, Accelerator(cpu=True))
            phis[name] = _phi(tmp_path / name)
    finally:
        handle.remove()
    half = len(layouts) // 2
    assert half > 0 and not any(layouts[:half]) and all(layouts[half:]), "φ's maps: NCHW, then NHWC"
    for k, v in phis["nchw"].items():
        torch.testing.assert_close(phis["nhwc"][k], v, rtol=1e-4, atol=1e-5)


def test_extra_sources_make_tasks_of_their_own(tmp_path, images):
    from accelerate import Accelerator

    from timm_metaperturb.training.meta import meta_train, source_tasks
    from train.meta import parse_args

    flags = ["--dataset", images, *TINY, "--steps", "1", "--extra-sources", "digits:0-5:3", f"{images}::1"]
    cfg = parse_args([*flags, "--output", str(tmp_path / "out")])
    data, tasks = source_tasks(cfg)
    n_own, n_images = 4, 4 * 24  # the folder's classes and images
    assert len(data.class_names) == 2 * n_own + 10 and data.class_names[n_own] == "digits/0"
    assert [t.index for t in tasks] == list(range(4 + 6 + 2))
    domains = [{0 if c < n_own else 1 if c < n_own + 10 else 2 for c in t.classes} for t in tasks]
    assert domains == [{0}] * 4 + [{1}] * 6 + [{2}] * 2, "a task never mixes datasets"
    assert sorted({c for t in tasks[4:10] for c in t.classes}) == list(range(n_own, n_own + 6)), "digits 0-5 only"
    for t in tasks:
        labels = data.labels[torch.cat([t.train, t.val])]
        assert set(labels.tolist()) == set(t.classes), "the indices point at the task's own images"
        assert t.remap(labels).min() == 0 and t.remap(labels).max() == len(t.classes) - 1
    assert torch.equal(data.images[-n_images:], data.images[:n_images]), "the folder again, after the digits"

    meta_train(cfg, Accelerator(cpu=True))
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert len(run["tasks"]) == 12 and run["config"]["extra_sources"] == ["digits:0-5:3", f"{images}::1"]
    assert f"{images} + digits + {images}" in (tmp_path / "out" / "phi" / "README.md").read_text()


def test_val_split_validates_each_task_on_the_other_split(tmp_path):
    from accelerate import Accelerator

    from timm_metaperturb.training.meta import meta_train, source_tasks
    from train.meta import parse_args

    root = tmp_path / "splits"
    make_image_folder(root / "train")
    make_image_folder(root / "test", per_class=10, seed=1)
    flags = ["--dataset", str(root), *TINY, "--steps", "1"]
    _, own_halves = source_tasks(parse_args(flags))
    cfg = parse_args([*flags, "--val-split", "test", "--output", str(tmp_path / "out")])
    data, tasks = source_tasks(cfg)
    for t, half in zip(tasks, own_halves, strict=True):
        assert torch.equal(t.train, half.train), "the training images stay the task's own"
        assert t.val.min() >= 4 * 24, "validation images come from the test split only"
        assert len(t.val) == 10 * len(t.classes), "all of them"
        assert set(data.labels[t.val].tolist()) == set(t.classes)
    meta_train(cfg, Accelerator(cpu=True))
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["config"]["val_split"] == "test" and run["tasks"][0]["val"] == 20

    short = parse_args([*flags, "--val-split", "test", "--batch-size", "24"])
    with pytest.raises(ValueError, match="fewer than 24 validation images in split 'test'"):
        source_tasks(short)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "resnet_nonexistent"], "unknown source network"),
        (["--dataset", "/no/such/folder"], "is a path, and nothing exists there"),
        (["--groups", "3"], "cannot make 3 class-wise groups"),
        (["--batch-size", "64"], "fewer than 64 training or validation images"),
        (["--extra-sources", "digits:0-4"], "a source is DATASET:CLASSES:GROUPS"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, images, args, message):
    from accelerate import Accelerator

    from timm_metaperturb.training.meta import meta_train
    from train.meta import parse_args

    cfg = parse_args(["--dataset", images, *TINY, "--steps", "1", "--output", str(tmp_path / "out"), *args])
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        meta_train(cfg, Accelerator(cpu=True))
    assert not (tmp_path / "out" / "run.json").exists()


def test_a_collapsed_validation_is_warned_with_what_to_do():
    def history(losses, accuracies):
        return [{"step": 10 * (i + 1), "val_loss": v, "val_acc": a}
                for i, (v, a) in enumerate(zip(losses, accuracies, strict=True))]  # fmt: skip

    assert collapse_warning(history([3.0, 2.7, 2.1, 0.9], [0.05, 0.1, 0.3, 0.7])) is None
    assert collapse_warning(history([3.0, 2.1, 2.5], [0.05, 0.3, 0.25])) is None  # a rise, not a collapse
    # one of three seeds of the letters recipe, as its run.json logged it
    warning = collapse_warning(history([3.0, 2.89, 2.78, 2.52, 2.3, 2.56, 4.84, 7.97],
                                       [0.04, 0.09, 0.11, 0.17, 0.23, 0.2, 0.11, 0.14]))  # fmt: skip
    assert "rose from 2.30 at step 50 to 7.97 at step 80" in warning and "--seed" in warning
    assert "up to step 50" in warning
    assert collapse_warning([]) is None


def test_corrupted_validation_changes_phi_and_is_on_its_card(tmp_path, images):
    common = ["--dataset", images, *TINY[:2], "--image-size", "32", *TINY[4:], "--steps", "2"]
    plain = run_python(["train/meta.py", *common, "--output", tmp_path / "plain"])
    corrupted = run_python(["train/meta.py", *common, "--val-corruptions", "noise,motion_blur", "--output",
                            tmp_path / "corrupted"])  # fmt: skip
    assert plain.returncode == 0 and corrupted.returncode == 0, corrupted.stderr
    a, b = _phi(tmp_path / "plain"), _phi(tmp_path / "corrupted")
    assert any(not torch.equal(a[k], b[k]) for k in a), "φ learns from the corrupted validation images"
    assert (
        "| validation images corrupted by | noise,motion_blur |" in (tmp_path / "corrupted/phi/README.md").read_text()
    )
    typo = run_python(["train/meta.py", *common, "--val-corruptions", "nosie", "--output", tmp_path / "typo"])
    assert typo.returncode != 0 and "unknown corruption type or family 'nosie'" in typo.stderr
