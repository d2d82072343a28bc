"""The data loader: built-ins, local image folders, tensors, augmentation."""

import numpy as np
import pytest
import torch
from PIL import Image

from timm_metaperturb.training.data import FASHION_MNIST_DIR, Augmentation, augment, load_image_dataset, to_tensors


def make_image_folder(root, classes=4, per_class=24, size=12, seed=0):
    """An image folder in datasets' imagefolder layout: one sub-folder per class, images whose brightness
    and colour depend on the class, grayscale and colour, of two sizes."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            side = size if i % 3 else size + 4
            pixels = rng.integers(0, 60, (side, side, 3)) + 60 * c
            image = Image.fromarray(pixels.astype(np.uint8))
            (image.convert("L") if i % 2 else image).save(root / f"class_{c}" / f"{i}.png")
    return root


def test_digits_builtin():
    ds = load_image_dataset("digits")
    assert len(ds) == 1797 and ds.features["label"].num_classes == 10
    data = to_tensors(ds, 16)
    assert data.images.shape == (1797, 3, 16, 16) and data.images.dtype == torch.uint8
    assert torch.equal(data.images[:, 0], data.images[:, 2]), "grayscale becomes 3 equal channels"
    with pytest.raises(ValueError, match="single split"):
        load_image_dataset("digits", "test")


def test_fashion_mnist_builtin():
    if not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
    ds = load_image_dataset("fashion_mnist", "test")
    assert len(ds) == 10_000 and ds.features["label"].names[9] == "Ankle boot"
    data = to_tensors(ds, 32)
    assert data.images.shape == (10_000, 3, 32, 32)
    assert torch.bincount(data.labels).tolist() == [1000] * 10


def test_local_image_folder(tmp_path):
    folder = make_image_folder(tmp_path / "images")
    ds = load_image_dataset(str(folder))
    assert len(ds) == 96 and ds.features["label"].names == [f"class_{c}" for c in range(4)]
    data = to_tensors(ds, 8)
    assert data.images.shape == (96, 3, 8, 8)
    means = [data.images[data.labels == c].float().mean().item() for c in range(4)]
    assert means == sorted(means), "class c is brighter than class c-1: images and labels stay paired"


def test_missing_dataset_says_what_was_tried(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing-here' is a path, and nothing exists there"):
        load_image_dataset(str(tmp_path / "nothing-here"))  # at once: a path is never asked of the Hub


def test_augmentation_is_reproducible_and_shaped():
    images = torch.randint(0, 256, (16, 3, 10, 10), dtype=torch.uint8)
    a = augment(images, Augmentation(), torch.Generator().manual_seed(1))
    b = augment(images, Augmentation(), torch.Generator().manual_seed(1))
    c = augment(images, Augmentation(), torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (16, 3, 10, 10) and a.min() >= -1 and a.max() <= 1
    plain = augment(images, Augmentation(crop_padding=0, hflip=False), torch.Generator())
    torch.testing.assert_close(plain, images.float() / 127.5 - 1)
    flipped = augment(images, Augmentation(crop_padding=0), torch.Generator().manual_seed(0))
    assert all(torch.equal(f, p) or torch.equal(f, p.flip(-1)) for f, p in zip(flipped, plain, strict=True))
    shifted = augment(images, Augmentation(crop_padding=2, hflip=False), torch.Generator().manual_seed(0))
    # every crop is the image moved by at most 2 pixels, zero-padded (-1 after normalisation)
    for s, p in zip(shifted, plain, strict=True):
        padded = torch.nn.functional.pad(p, (2, 2, 2, 2), value=-1.0)
        assert any(torch.equal(s, padded[:, dy : dy + 10, dx : dx + 10]) for dy in range(5) for dx in range(5))
