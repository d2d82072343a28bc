"""Patches of the photographs that ship with scikit-image and scikit-learn: an offline source of natural-image
statistics, in colour, for meta-training (the paper's φ was meta-learned on natural photographs).

Each class is one photograph (20). An image is a square patch of it, at a random place and size, its hue turned,
its contrast and brightness changed, and half of the colour ones made grey, so that neither colour nor brightness
tells the classes apart. Training patches come from the left 60% of each photograph, test patches from the right
40% and at larger sizes: another region at another scale, a shift as the glyph targets shift style. Everything is
drawn from a seed. `load_image_dataset("photo-patches")` returns it as a `datasets.Dataset`; no target is drawn
from it.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

NAME = "photo-patches"
CANVAS = 64
PER_CLASS = {"train": 40, "test": 30}
SIDE = {"train": (0.15, 0.3), "test": (0.3, 0.4)}  # a patch's side, as a fraction of the photograph's shorter side
TRAIN_WIDTH = 0.6  # training patches lie in the left 60% of a photograph, test patches in the rest
# class: the photograph, a `skimage.data` function or one of scikit-learn's sample images (SKLEARN_PHOTOS)
PHOTOS = {
    "astronaut": "astronaut", "brick": "brick", "camera": "camera", "cell": "cell", "chelsea": "chelsea",
    "clock": "clock", "coffee": "coffee", "coins": "coins", "grass": "grass", "gravel": "gravel",
    "hubble_deep_field": "hubble_deep_field", "immunohistochemistry": "immunohistochemistry", "moon": "moon",
    "page": "page", "retina": "retina", "rocket": "rocket", "text": "text", "motorcycle": "stereo_motorcycle",
    "china": "china.jpg", "flower": "flower.jpg",
}  # fmt: skip
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


def class_names() -> list[str]:
    return list(PHOTOS)


def photograph(name: str) -> np.ndarray:
    """One shipped photograph, uint8 (H, W) or (H, W, 3): a `skimage.data` function's name (`stereo_motorcycle`
    gives its left view) or a scikit-learn sample image (`china.jpg`, `flower.jpg`)."""
    if name in SKLEARN_PHOTOS:
        from sklearn.datasets import load_sample_image

        return load_sample_image(name)
    try:
        import skimage.data
    except ImportError as e:
        raise ImportError(f"{NAME} draws from scikit-image's photographs: pip install scikit-image") from e
    image = getattr(skimage.data, name)()
    return image[0] if isinstance(image, tuple) else image


@functools.cache
def photographs() -> tuple[np.ndarray, ...]:
    """Every class's photograph as RGB uint8 (H, W, 3), in `class_names` order."""
    photos = map(photograph, PHOTOS.values())
    return tuple(np.repeat(p[..., None], 3, axis=2) if p.ndim == 2 else p[..., :3] for p in photos)


def render(photo: np.ndarray, split: str, rng: np.random.Generator) -> np.ndarray:
    """One CANVAS x CANVAS x 3 uint8 patch of `photo` from the region and at the sizes of `split`."""
    height, width = photo.shape[:2]
    side = int(rng.uniform(*SIDE[split]) * min(height, width))
    left = (0, int(TRAIN_WIDTH * width) - side) if split == "train" else (int(TRAIN_WIDTH * width), width - side)
    x, y = int(rng.integers(left[0], left[1] + 1)), int(rng.integers(0, height - side + 1))
    patch = Image.fromarray(photo[y : y + side, x : x + side]).resize((CANVAS, CANVAS), Image.Resampling.BICUBIC)
    hsv = np.asarray(patch.convert("HSV")).copy()
    hsv[..., 0] += np.uint8(rng.integers(0, 256))  # a turn of the hue wheel (uint8 wraps around)
    patch = Image.fromarray(hsv, "HSV").convert("RGB")
    if rng.random() < 0.5:
        patch = patch.convert("L").convert("RGB")
    image = np.asarray(patch, dtype=float)
    image = (image - image.mean()) * rng.uniform(0.6, 1.4) + image.mean() + rng.uniform(-30, 30)
    return image.round().clip(0, 255).astype(np.uint8)


def render_split(split: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images (N, CANVAS, CANVAS, 3) uint8, labels (N,), class names) of "train" or "test", for
    `load_image_dataset`."""
    from .data import draw_split

    photos = photographs()
    return draw_split(NAME, split, PER_CLASS, class_names(), lambda label, rng: render(photos[label], split, rng), seed)
