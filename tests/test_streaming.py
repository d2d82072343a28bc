"""Streamed images: the same batches as in memory, timm's transforms seeded per image, bad files, pretrained weights."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from test_data import make_image_folder

from timm_metaperturb.training.data import Augmentation, EpochSampler
from timm_metaperturb.training.streaming import StreamedImages, UnreadableImageError, batches_of
from timm_metaperturb.training.target import TargetConfig, TrainBatches, prepare_data, train_target

REPO_TARGET = [sys.executable, "train/target.py"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data") / "images")


def config(folder, **overrides) -> TargetConfig:
    settings = dict(dataset=str(folder), val_fraction=0.25, model="conv4", image_size=16, batch_size=12, steps=4,
                    crop_padding=2, eval_every=2, progress=False, plots=False, workers=2)  # fmt: skip
    return TargetConfig(**{**settings, **overrides})


def batches(cfg, train, steps: int, rank: int = 0, world_size: int = 1) -> list:
    sampler = EpochSampler(len(train), cfg.batch_size, 7)
    aug = Augmentation(cfg.crop_padding, cfg.hflip, noise=cfg.noise_augment, augmix=cfg.augmix)
    source = TrainBatches(train, aug, sampler, cfg, 0, "cpu", rank, world_size)
    return [source.next() for _ in range(steps)]


@pytest.mark.parametrize(("noise", "augmix"), [(0.0, 0), (0.2, 3)])
def test_streamed_batches_equal_the_in_memory_ones(folder, noise, augmix):
    """The reference recipe over files of two sizes, grayscale and colour: the same training batches (crops and
    flips included, across an epoch boundary; AugMix and pixel noise too), the same evaluation batches, and two
    processes' shares of a batch put together are the one-process batch."""
    memory_cfg = config(folder, loader="memory", steps=8, noise_augment=noise, augmix=augmix)
    stream_cfg = config(folder, loader="stream", steps=8, noise_augment=noise, augmix=augmix)
    memory, memory_test = prepare_data(memory_cfg)
    stream, stream_test = prepare_data(stream_cfg)
    assert isinstance(stream, StreamedImages) and not isinstance(memory, StreamedImages)
    assert torch.equal(memory.labels, stream.labels) and torch.equal(memory_test.labels, stream_test.labels)
    steps = 8  # 72 training images: the sampler starts a new epoch at step 7
    for (xm, ym), (xs, ys) in zip(batches(memory_cfg, memory, steps), batches(stream_cfg, stream, steps), strict=True):
        assert torch.equal(xm, xs) and torch.equal(ym, ys)
    aug = Augmentation(memory_cfg.crop_padding, memory_cfg.hflip)
    for (xm, ym), (xs, ys) in zip(batches_of(memory_test, aug, "cpu", 5), batches_of(stream_test, aug, "cpu", 5),
                                  strict=True):  # fmt: skip
        assert torch.equal(xm, xs) and torch.equal(ym, ys)
    for kind in (memory, stream):
        whole = batches(memory_cfg, kind, 3)
        shares = [batches(memory_cfg, kind, 3, rank, 2) for rank in (0, 1)]
        for step in range(3):
            assert torch.equal(torch.cat([shares[0][step][0], shares[1][step][0]]), whole[step][0])


def test_auto_streams_what_would_not_fit_in_memory(folder, monkeypatch):
    """--loader auto holds the paper's transform in memory, and streams once the decoded images would pass the
    memory budget, or with timm's transforms."""
    import timm_metaperturb.training.target as target

    assert not isinstance(prepare_data(config(folder, loader="auto"))[0], StreamedImages)
    assert isinstance(prepare_data(config(folder, loader="auto", augment="timm"))[0], StreamedImages)
    monkeypatch.setattr(target, "MEMORY_BUDGET", 96 * 3 * 16 * 16 - 1)  # one byte short of the folder's images
    assert isinstance(prepare_data(config(folder, loader="auto"))[0], StreamedImages)


def test_timm_transforms_are_drawn_per_image_from_the_seed(folder):
    """timm's random-resized crop, flip and RandAugment: the same batches with and without workers and split over
    processes; another seed draws others; evaluation is timm's deterministic transform of the model's config."""
    import timm
    from timm.data import create_transform, resolve_data_config

    timm_cfg = dict(augment="timm", model="resnet18", image_size=32, auto_augment="rand-m9-mstd0.5")
    cfg = config(folder, **timm_cfg)
    train, test = prepare_data(cfg)
    no_workers, _ = prepare_data(config(folder, **timm_cfg, workers=0))
    a, b = batches(cfg, train, 3), batches(cfg, no_workers, 3)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b, strict=True))
    other = batches(config(folder, **timm_cfg, seed=1), train, 1)
    assert not torch.equal(other[0][0], a[0][0])
    shares = [batches(cfg, train, 1, rank, 2)[0][0] for rank in (0, 1)]
    assert torch.equal(torch.cat(shares), a[0][0])
    assert a[0][0].shape == (12, 3, 32, 32)
    expected = create_transform(**resolve_data_config({"input_size": (3, 32, 32)}, model=timm.create_model("resnet18")))
    x, _ = next(batches_of(test, Augmentation(), "cpu", 4))
    first = Image.open(test.ds[int(test.indices[0])]["image"]["path"]).convert("RGB")
    assert torch.allclose(x[0], expected(first), atol=1e-6)


def test_unreadable_files_are_named_or_left_out(tmp_path, folder):
    """A truncated JPEG stops the run with its path, or with --skip-unreadable is left out with a warning naming
    it; a class folder without images and an image size the network cannot take fail before training."""
    import shutil

    root = tmp_path / "photos"
    shutil.copytree(folder, root)
    broken = root / "class_1" / "broken.jpg"
    Image.new("RGB", (40, 40), "red").save(broken)
    broken.write_bytes(broken.read_bytes()[:200])
    with pytest.raises(UnreadableImageError, match=r"broken\.jpg.*--skip-unreadable"):
        train_target(config(root, loader="stream", workers=0, output=str(tmp_path / "a")))
    with pytest.warns(UserWarning, match=r"broken\.jpg.*left out"):
        run = train_target(config(root, loader="stream", workers=0, skip_unreadable=True, method="base",
                                  output=str(tmp_path / "b")))  # fmt: skip
    assert run["final"]["step"] == 4

    (root / "class_9").mkdir()
    with pytest.raises(ValueError, match=r"class_9: add images or remove the folder"):
        prepare_data(config(root))
    (root / "class_9").rmdir()
    with pytest.raises(ValueError, match=r"conv4 cannot take 8x8 images.*larger --image-size"):
        train_target(config(folder, image_size=8, output=str(tmp_path / "c")))


def test_pretrained_weights_from_a_hub_folder(tmp_path, folder, hub_server, hub_env):
    """--pretrained with a hf-hub: model (a timm-format folder served the way the Hub serves it): every weight but
    the classifier starts as the folder's, the classifier is new for the dataset's 4 classes, and timm's transforms
    take the folder's mean and std."""
    import timm
    from safetensors.torch import load_file

    source = timm.create_model("resnet18", num_classes=10, pretrained_cfg_overlay={"mean": (0.1, 0.2, 0.3)})
    timm.models.save_for_hf(source, tmp_path / "backbone", safe_serialization=True)
    hub_server.add("someone/resnet18-test", tmp_path / "backbone")
    out = tmp_path / "run"
    command = [*REPO_TARGET, "--dataset", str(folder), "--val-fraction", "0.25", "--model",
               "hf-hub:someone/resnet18-test", "--pretrained", "--image-size", "32", "--steps", "1",
               "--eval-every", "1", "--batch-size", "8", "--lr", "0", "--workers", "0",
               "--no-plots", "--no-progress", "--output", str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **hub_env})
    assert result.returncode == 0, result.stderr
    trained, original = load_file(out / "model.safetensors"), load_file(tmp_path / "backbone" / "model.safetensors")
    assert trained["fc.weight"].shape == (4, 512) and original["fc.weight"].shape == (10, 512)
    same = [k for k in original if not k.startswith("fc.") and "running" not in k and "num_batches" not in k]
    assert same and all(torch.equal(trained[k], original[k]) for k in same), "lr 0: the backbone stays as loaded"
    assert (out / "metaperturb.safetensors").is_file(), "φ attached after the weights were loaded"
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["pretrained_cfg"]["mean"] == [0.1, 0.2, 0.3] and config_json["num_classes"] == 4

    missing = [*command[: command.index("hf-hub:someone/resnet18-test")], "hf-hub:someone/nothing-here",
               *command[command.index("hf-hub:someone/resnet18-test") + 1 :]]  # fmt: skip
    failed = subprocess.run(missing, capture_output=True, text=True, env={**os.environ, **hub_env})
    assert failed.returncode != 0 and "--pretrained could not load the weights of hf-hub:someone/nothing-here" in (
        failed.stderr
    )

    # a trained network's folder (with MetaPerturb's files beside it) is a pretrained backbone too: its weights
    again = tmp_path / "again"
    train_target(config(folder, model=f"local-dir:{out}", pretrained=True, image_size=32, lr=0.0, steps=1,
                        method="base", workers=0, output=str(again)))  # fmt: skip
    assert torch.equal(load_file(again / "model.safetensors")["conv1.weight"], trained["conv1.weight"])


def test_photo_folder_writes_real_photos_of_varied_sizes(tmp_path):
    """train/photo_folder.py: 10 class folders per split, colour and grayscale JPEGs of many sizes, the same files
    from the same seed."""
    from train.photo_folder import PHOTOS, write_photo_folder

    first = write_photo_folder(tmp_path / "a", train_per_class=3, test_per_class=1)
    again = write_photo_folder(tmp_path / "b", train_per_class=3, test_per_class=1)
    for split, count in (("train", 3), ("test", 1)):
        assert sorted(d.name for d in (first / split).iterdir()) == sorted(PHOTOS)
        assert all(len(list((first / split / c).glob("*.jpg"))) == count for c in PHOTOS)
    files = sorted(first.rglob("*.jpg"))
    images = [Image.open(f) for f in files]
    assert {im.mode for im in images} == {"L", "RGB"} and len({im.size for im in images}) > 30
    assert all(f.read_bytes() == (again / f.relative_to(first)).read_bytes() for f in files)


def test_noise_augmentation_adds_bounded_noise_to_the_same_crops(folder):
    clean_cfg, noisy_cfg = config(folder, loader="memory"), config(folder, loader="memory", noise_augment=0.2)
    train, _ = prepare_data(clean_cfg)
    (clean, y), (noisy, y_noisy) = batches(clean_cfg, train, 1)[0], batches(noisy_cfg, train, 1)[0]
    assert torch.equal(y, y_noisy), "noise is drawn after the order, crops and flips: the same images"
    difference = (noisy - clean) * 0.5  # back to pixels in [0, 1]
    per_image = difference.flatten(1).std(1)
    assert 0 < per_image.max() <= 0.2 and per_image.std() > 0.01, "each image has its own std, at most 0.2"
    with pytest.raises(ValueError, match="--augment reference"):
        prepare_data(config(folder, augment="timm", noise_augment=0.2))


def test_augmix_changes_each_image_its_own_way_and_keeps_the_rest(folder):
    clean_cfg, mixed_cfg = config(folder, loader="memory"), config(folder, loader="memory", augmix=3)
    train, _ = prepare_data(clean_cfg)
    (clean, y), (mixed, y_mixed) = batches(clean_cfg, train, 1)[0], batches(mixed_cfg, train, 1)[0]
    assert torch.equal(y, y_mixed) and clean.shape == mixed.shape
    changed = (mixed - clean).abs().flatten(1).mean(1)
    assert (changed > 0).float().mean() > 0.5, "most images are changed"
    assert torch.equal(batches(mixed_cfg, train, 1)[0][0], mixed), "the same seed gives the same mixes"
