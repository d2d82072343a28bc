"""Write a small folder of real photos to try `train/target.py` on your own images: crops of scikit-image's sample
photos (`skimage.data`, shipped in its wheel), one class per photo, JPEG files of varied sizes, colour and grayscale.

    pip install scikit-image
    python train/photo_folder.py photos
    python train/target.py --dataset photos --model resnet18 --image-size 128 --augment timm --steps 300

photos/train/<class>/*.jpg come from the left 60% of each photo, photos/test/<class>/*.jpg from the right 35%, so
no test crop overlaps a training crop. Each crop is 20-60% of the photo's height, of aspect 3:4 to 4:3, scaled by
0.6-1.4: from a few dozen to about a thousand pixels a side. The same seed writes the same files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from timm_metaperturb.command_line import run_main
from timm_metaperturb.training.photo_patches import photograph

PHOTOS = {  # class: the skimage.data function (a colour or grayscale photo)
    "astronaut": "astronaut", "cat": "chelsea", "coffee": "coffee", "rocket": "rocket",
    "motorcycle": "stereo_motorcycle", "galaxies": "hubble_deep_field", "retina": "retina", "brick": "brick",
    "grass": "grass", "gravel": "gravel",
}  # fmt: skip
REGIONS = {"train": (0.0, 0.6), "test": (0.65, 1.0)}  # of each photo's width


def crop(image: np.ndarray, region: tuple[float, float], rng: np.random.Generator) -> Image.Image:
    """A random crop inside `region` (fractions of the width), randomly rescaled."""
    height, width = image.shape[:2]
    left, right = round(region[0] * width), round(region[1] * width)
    side = rng.uniform(0.2, 0.6) * height
    aspect = rng.uniform(0.75, 4 / 3)
    h, w = min(height, round(side)), min(right - left, round(side * aspect))
    top, start = rng.integers(0, height - h + 1), rng.integers(left, right - w + 1)
    piece = Image.fromarray(image[top : top + h, start : start + w])
    scale = rng.uniform(0.6, 1.4)
    return piece.resize((max(8, round(w * scale)), max(8, round(h * scale))), Image.Resampling.BICUBIC)


def write_photo_folder(root: Path, train_per_class: int = 30, test_per_class: int = 10, seed: int = 0) -> Path:
    """The folder (imagefolder layout with train and test splits); returns root."""
    counts = {"train": train_per_class, "test": test_per_class}
    for index, (label, name) in enumerate(PHOTOS.items()):
        image = photograph(name)
        for split, region in REGIONS.items():
            rng = np.random.default_rng([seed, index, split == "test"])
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(counts[split]):
                crop(image, region, rng).save(folder / f"{label}_{i:03d}.jpg", quality=90)
    return root


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, help="the folder to write (train/ and test/ inside)")
    parser.add_argument("--train-per-class", type=int, default=30)
    parser.add_argument("--test-per-class", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = write_photo_folder(args.output, args.train_per_class, args.test_per_class, args.seed)
    sizes = [Image.open(f).size for f in root.rglob("*.jpg")]
    print(f"{len(sizes)} photos in {root} ({len(PHOTOS)} classes), from {min(map(min, sizes))} to "
          f"{max(map(max, sizes))} pixels a side")  # fmt: skip
    return root


if __name__ == "__main__":
    run_main(main)
