"""Photo patches: reproducible, balanced, in colour, test patches from another region of each photograph, loadable
as a built-in, and a clear error for a split it does not have."""

import numpy as np
import pytest

from timm_metaperturb.training import photo_patches as pp
from timm_metaperturb.training.data import load_image_dataset, to_tensors


def test_a_split_is_reproducible_balanced_and_in_colour():
    images, labels, names = pp.render_split("test")
    assert images.shape == (20 * pp.PER_CLASS["test"], pp.CANVAS, pp.CANVAS, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [pp.PER_CLASS["test"]] * 20 and len(set(names)) == 20
    again, _, _ = pp.render_split("test")
    assert np.array_equal(images, again)
    assert not np.array_equal(images, pp.render_split("test", seed=1)[0])
    grey = (images.max(-1) - images.min(-1)).max((1, 2)) == 0
    assert 0.3 < grey.mean() < 0.9, "colour photographs are grey half the time, grey ones always"
    # brightness does not tell classes apart: every class spans dark and bright patches
    brightness = images.mean((1, 2, 3))
    assert all(np.ptp(brightness[labels == c]) > 25 for c in range(20))


def test_training_and_test_patches_come_from_different_regions():
    photo = np.zeros((200, 300, 3), np.uint8)
    photo[:, int(pp.TRAIN_WIDTH * 300) :] = 255  # the left 60% black, the rest white
    rng = np.random.default_rng(0)
    train = np.stack([pp.render(photo, "train", rng) for _ in range(50)])
    test = np.stack([pp.render(photo, "test", rng) for _ in range(50)])
    assert train.max() <= 30 < 225 <= test.min()


def test_photo_patches_is_a_builtin_dataset():
    ds = load_image_dataset("photo-patches", "train")
    assert len(ds) == 20 * pp.PER_CLASS["train"] and ds.features["label"].names[0] == "astronaut"
    assert to_tensors(ds, 16).images.shape == (len(ds), 3, 16, 16)
    with pytest.raises(ValueError, match=r"'train' and 'test', not 'validation'"):
        load_image_dataset("photo-patches", "validation")
