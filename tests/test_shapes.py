"""The procedural colour dataset: reproducible, balanced, in colour, test images in another style, loadable as a
built-in and a clear error for a split it does not have."""

import numpy as np
import pytest

from timm_metaperturb.training import shapes
from timm_metaperturb.training.data import load_image_dataset, to_tensors


@pytest.fixture(scope="module")
def train():
    return shapes.render_split("train")


def test_a_split_is_reproducible_balanced_and_in_colour(train):
    images, labels, names = train
    assert (
        images.shape == (32 * shapes.PER_CLASS["train"], shapes.CANVAS, shapes.CANVAS, 3) and images.dtype == np.uint8
    )
    assert np.bincount(labels).tolist() == [shapes.PER_CLASS["train"]] * 32 and len(set(names)) == 32
    one, again, other = (shapes.render("star", "checks", "train", np.random.default_rng(s)) for s in (0, 0, 1))
    assert np.array_equal(one, again) and not np.array_equal(one, other)
    assert len({images[i].tobytes() for i in range(0, len(images), 7)}) == len(range(0, len(images), 7))
    colour = np.abs(images.astype(int) - images.mean(-1, keepdims=True)).mean()
    assert colour > 10, "the images are in colour, not grey"
    # only shape and pattern tell classes apart: the mean colour of a class is close to that of the whole split
    by_class = np.stack([images[labels == c].mean((0, 1, 2)) for c in range(32)])
    assert np.abs(by_class - images.mean((0, 1, 2))).max() < 40


def test_test_images_lie_on_noisy_gradients(train):
    test, labels, _ = shapes.render_split("test")
    assert np.bincount(labels).tolist() == [shapes.PER_CLASS["test"]] * 32

    def corner_spread(images):  # how much a corner's pixels vary: 0 on a flat background
        return images[:, :8, :8].astype(float).std((1, 2)).mean()

    assert corner_spread(train[0]) < 1 < 10 < corner_spread(test)


def test_shapes_is_a_builtin_dataset():
    ds = load_image_dataset("shapes", "test")
    assert len(ds) == 32 * shapes.PER_CLASS["test"] and ds.features["label"].names[0] == "triangle solid"
    tensors = to_tensors(ds, 16)
    assert tensors.images.shape == (len(ds), 3, 16, 16)
    assert not np.array_equal(tensors.images[:, 0].numpy(), tensors.images[:, 1].numpy()), "colour kept"
    with pytest.raises(ValueError, match=r"'train' and 'test', not 'validation'"):
        load_image_dataset("shapes", "validation")
