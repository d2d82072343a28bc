"""Image-classification data for meta-training and target training.

`load_image_dataset` returns a `datasets.Dataset` with an `image` and a `label` column from a Hub dataset name,
a local image folder, or an offline built-in: `fashion_mnist` (Debian's `dataset-fashion-mnist` files),
`digits` (scikit-learn's 8x8 digits), `glyphs-<script>` (letters rendered from Debian's fonts, `glyphs.py`),
`shapes` (coloured shapes and patterns drawn procedurally, `shapes.py`) and `photo-patches` (patches of the
photographs that ship with scikit-image, `photo_patches.py`).
`to_tensors` turns it into one uint8 tensor of 3-channel images at a fixed size, and `augment` makes training
batches from it on the fly (random crop with padding, horizontal flip, normalisation), driven by an explicit
generator so that runs are reproducible and resumable.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from ..hub import missing_local_path
from . import photo_patches, shapes
from .glyphs import builtin_names, render_builtin

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
DRAWN = {shapes.NAME: shapes.render_split, photo_patches.NAME: photo_patches.render_split}  # drawn from a seed
BUILTINS = ("fashion_mnist", "digits", *builtin_names(), *DRAWN)


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): magic (2 zero bytes, dtype code, ndim), big-endian dims, then the data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist(split: str):
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"fashion_mnist has the splits 'train' and 'test', not '{split}'")
    files = [FASHION_MNIST_DIR / f"{prefix}-{kind}-idx{n}-ubyte.gz" for kind, n in (("images", 3), ("labels", 1))]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found: {', '.join(missing)}. Install Debian's package "
            "(apt-get install dataset-fashion-mnist) or set FASHION_MNIST_DIR to a folder that holds them"
        )
    return _array_dataset(_read_idx(files[0]), _read_idx(files[1]), list(FASHION_MNIST_CLASSES))


def _digits(split: str):
    if split != "train":
        raise ValueError(
            f"digits has a single split, 'train' (1,797 images); split it yourself for testing, not '{split}'"
        )
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    return _array_dataset(images, digits.target, [str(d) for d in range(10)])


def _array_dataset(images: np.ndarray, labels: np.ndarray, class_names: list[str]):
    """A `datasets.Dataset` of equal-sized uint8 images, grayscale (N, H, W) or colour (N, H, W, 3), and their
    class labels."""
    array = datasets.Array2D if images.ndim == 3 else datasets.Array3D
    features = datasets.Features(
        {
            "image": array(shape=images.shape[1:], dtype="uint8"),
            "label": datasets.ClassLabel(names=class_names),
        }
    )
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def _standardise_columns(ds, name: str):
    """Rename the dataset's image and class-label columns to `image` and `label`."""
    image_cols = [
        c for c, f in ds.features.items() if isinstance(f, (datasets.Image, datasets.Array2D, datasets.Array3D))
    ]
    label_cols = [c for c, f in ds.features.items() if isinstance(f, datasets.ClassLabel)]
    if not image_cols or not label_cols:
        raise ValueError(f"dataset '{name}' needs an image column and a ClassLabel column; it has {dict(ds.features)}")
    ds = ds.select_columns([image_cols[0], label_cols[0]])
    return ds.rename_columns({image_cols[0]: "image", label_cols[0]: "label"})


def load_image_dataset(name: str, split: str = "train"):
    """A `datasets.Dataset` with `image` and `label` (a ClassLabel) columns.

    `name` is a built-in (`fashion_mnist`, `digits`, `glyphs-<script>`, `shapes`, `photo-patches`), a local
    folder of images in one sub-folder per class (datasets' `imagefolder` layout), or a Hugging Face Hub dataset name
    (needs network the first time).
    """
    if name == "fashion_mnist":
        return _fashion_mnist(split)
    if name == "digits":
        return _digits(split)
    if name.startswith("glyphs-"):
        return _array_dataset(*render_builtin(name, split))
    if name in DRAWN:
        return _array_dataset(*DRAWN[name](split))
    if os.path.isdir(name):
        check_class_folders(Path(name))
        ds = datasets.load_dataset("imagefolder", data_dir=name, split=split)
    elif (reason := missing_local_path(name)) is not None:
        raise FileNotFoundError(f"dataset {reason}: pass a folder of images (a sub-folder per class) or a Hub dataset")
    else:
        try:
            ds = datasets.load_dataset(name, split=split)
        except Exception as e:
            raise FileNotFoundError(
                f"could not load dataset '{name}' (split '{split}'): it is not a built-in ({', '.join(BUILTINS)}), "
                f"not a local folder, and loading it from the Hugging Face Hub failed: {type(e).__name__}: {e}"
            ) from e
    return _standardise_columns(ds, name)


SPLIT_FOLDERS = ("train", "test", "validation", "valid", "val", "dev", "eval")  # datasets' split names


def check_class_folders(root: Path) -> None:
    """An image folder's class sub-folders (inside split folders where there are some) each hold an image: datasets
    would silently drop an empty one from the classes."""
    from PIL import Image

    extensions = {e.lower() for e in Image.registered_extensions()}
    folders = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    if folders and all(d.name.lower() in SPLIT_FOLDERS for d in folders):
        folders = [c for d in folders for c in sorted(d.iterdir()) if c.is_dir() and not c.name.startswith(".")]
    empty = [str(d) for d in folders if not any(f.suffix.lower() in extensions for f in d.rglob("*") if f.is_file())]
    if empty:
        raise ValueError(f"class folder(s) without images: {', '.join(empty)}: add images or remove the folder")


@dataclass
class ImageTensors:
    """A dataset held as tensors: uint8 images (N, 3, S, S) and int64 labels (N,), with its class names."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def to_tensors(ds, image_size: int) -> ImageTensors:
    """Decode, make 3-channel and resize every image of `ds` once (bilinear, antialiased)."""
    if isinstance(ds.features["image"], datasets.Image):  # PIL images, possibly of different sizes and modes
        images = [np.asarray(im if im.mode in ("L", "RGB") else im.convert("RGB")) for im in ds["image"]]
        batches = _batches_of_one_shape(images)
    else:  # one array of equal-sized images
        images = _numpy_column(ds, "image").astype(np.uint8)
        batches = np.array_split(images[..., None] if images.ndim == 3 else images, max(1, len(images) // 4096))
    resized = [_resize(torch.from_numpy(np.ascontiguousarray(b)), image_size) for b in batches]
    labels = torch.as_tensor(_numpy_column(ds, "label"), dtype=torch.int64)
    return ImageTensors(torch.cat(resized), labels, list(ds.features["label"].names))


def _numpy_column(ds, name: str) -> np.ndarray:
    return ds.select_columns([name]).with_format("numpy")[:][name]


def _batches_of_one_shape(images: list[np.ndarray], max_batch: int = 4096) -> list[np.ndarray]:
    """Runs of consecutive images of one shape, stacked as (N, H, W, C), so that resizing works on batches."""
    batches: list[list[np.ndarray]] = []
    for im in images:
        im = im[..., None] if im.ndim == 2 else im[..., :3]
        if batches and batches[-1][0].shape == im.shape and len(batches[-1]) < max_batch:
            batches[-1].append(im)
        else:
            batches.append([im])
    return [np.stack(b) for b in batches]


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, H, W, C) uint8 -> (N, 3, size, size) uint8; grayscale is repeated to 3 channels."""
    x = images.permute(0, 3, 1, 2).float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


@dataclass(frozen=True)
class Augmentation:
    """The reference's transforms: random crop with `crop_padding` zero padding, horizontal flip, then
    normalisation with `mean` and `std` (0.5, 0.5: images in [-1, 1]; a pretrained network's per channel).
    Two augmentations that robustness to corrupted images is often trained with, each off at 0: `augmix`, AugMix at
    that severity (the paper's 3) after the crop and flip, and `noise`, Gaussian pixel noise of a std drawn from
    [0, noise] per image (pixels in [0, 1], clipped back to it)."""

    crop_padding: int = 4
    hflip: bool = True
    mean: float | tuple[float, ...] = 0.5
    std: float | tuple[float, ...] = 0.5
    noise: float = 0.0
    augmix: int = 0


def normalise(images: torch.Tensor, aug: Augmentation, draws: CropFlip | None = None) -> torch.Tensor:
    """uint8 images (..., C, H, W) to floats normalised with `aug`'s mean and std (numbers, or one per channel);
    training images with their `draws` also get their AugMix and pixel noise, if the augmentation adds them."""
    mean, std = (torch.tensor(v, device=images.device).view(-1, 1, 1) if isinstance(v, tuple) else v
                 for v in (aug.mean, aug.std))  # fmt: skip
    seeds = None if draws is None else draws.image_seed
    if seeds is not None and aug.augmix:
        images = augmix(images, seeds, aug.augmix)
    pixels = images.float() / 255
    if seeds is not None and aug.noise:
        pixels = (pixels + pixel_noise(pixels.shape, seeds, aug.noise).to(pixels.device)).clamp(0, 1)
    return (pixels - mean) / std


# AugMix's own operations (Hendrycks et al., 2020): none of them is one of the corruptions it is tested on (no
# contrast, colour, brightness or sharpness change), as timm's default AugMix list would have
AUGMIX_OPS = ["AutoContrast", "Equalize", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "ShearX", "ShearY",
              "TranslateXRel", "TranslateYRel"]  # fmt: skip


@contextmanager
def seeded_generators(seed: int) -> Iterator[None]:
    """Python's, NumPy's and torch's global generators seeded from `seed` for the block (timm's transforms draw from
    all three), their states restored afterwards, so that the training's own random state is left alone."""
    states = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
            yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])


def augmix(images: torch.Tensor, seeds: torch.Tensor, severity: int) -> torch.Tensor:
    """uint8 images (N, 3, H, W) through timm's AugMix (width 3, depth 1-3, alpha 1) with AugMix's own operations,
    each image drawn from its own seed: AugMix's augmentation, without its consistency loss."""
    from PIL import Image
    from timm.data.auto_augment import AugMixAugment, augmix_ops

    mix = AugMixAugment(augmix_ops(severity, {"magnitude_std": float("inf")}, AUGMIX_OPS), alpha=1.0, width=3)
    out = []
    for image, seed in zip(images.cpu(), seeds.tolist(), strict=True):
        with seeded_generators(seed):
            mixed = mix(Image.fromarray(image.permute(1, 2, 0).numpy()))
        out.append(torch.from_numpy(np.asarray(mixed, dtype=np.uint8).copy()).permute(2, 0, 1))
    return torch.stack(out).to(images.device)


def pixel_noise(shape: torch.Size, seeds: torch.Tensor, largest: float) -> torch.Tensor:
    """Gaussian noise for a batch of images, each image's from its own seed (so a process or a loader worker makes
    exactly the noise of its share of a batch): std drawn from [0, largest], then the noise."""
    noise = torch.empty(shape)
    for i, seed in enumerate(seeds.tolist()):
        generator = torch.Generator().manual_seed(seed)
        noise[i] = largest * torch.rand((), generator=generator) * torch.randn(shape[1:], generator=generator)
    return noise


@dataclass(frozen=True)
class CropFlip:
    """One batch's draws of the reference augmentation: where each image's crop starts in its padded copy (`dy`,
    `dx`) and whether it is flipped; None where the augmentation does not crop or flip. Indexing gives a sub-batch's
    draws, so that a process or a loader worker applies exactly the draws a whole batch made."""

    dy: torch.Tensor | None
    dx: torch.Tensor | None
    flip: torch.Tensor | None
    image_seed: torch.Tensor | None = None  # for the augmentations drawn per image (AugMix, pixel noise)

    def __getitem__(self, index) -> CropFlip:
        return CropFlip(*(None if t is None else t[index] for t in (self.dy, self.dx, self.flip, self.image_seed)))


def draw_crop_flip(n: int, aug: Augmentation, generator: torch.Generator) -> CropFlip:
    p = aug.crop_padding
    dy = torch.randint(0, 2 * p + 1, (n,), generator=generator) if p else None
    dx = torch.randint(0, 2 * p + 1, (n,), generator=generator) if p else None
    flip = torch.rand(n, generator=generator) < 0.5 if aug.hflip else None
    # drawn last, so that without them every other draw is what it was
    image_seed = torch.randint(0, 2**62, (n,), generator=generator) if aug.noise or aug.augmix else None
    return CropFlip(dy, dx, flip, image_seed)


def crop_flip(images: torch.Tensor, draws: CropFlip, aug: Augmentation) -> torch.Tensor:
    """uint8 images (N, C, H, W) cropped (zero padding `aug.crop_padding`) and flipped as `draws` say."""
    n, channels, h, w = images.shape
    p = aug.crop_padding
    if p:
        padded = F.pad(images, (p, p, p, p))
        rows = (draws.dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, channels, h, w + 2 * p)
        images = padded.gather(2, rows)
        cols = (draws.dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, channels, h, w)
        images = images.gather(3, cols)
    if aug.hflip:
        images = torch.where(draws.flip[:, None, None, None], images.flip(-1), images)
    return images


def augment(images: torch.Tensor, aug: Augmentation, generator: torch.Generator) -> torch.Tensor:
    """A training batch from uint8 images: per-image random crop and flip drawn from `generator`, normalised."""
    draws = draw_crop_flip(len(images), aug, generator)
    return normalise(crop_flip(images, draws, aug), aug, draws)


class EpochSampler:
    """Batches of indices without replacement within an epoch, reshuffled each epoch (last partial batch
    dropped), from its own generator; its state is saved in checkpoints."""

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        self.size, self.batch_size = size, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.position = torch.randperm(size, generator=self.generator), 0

    def next(self) -> torch.Tensor:
        if self.position + self.batch_size > self.size:
            self.order, self.position = torch.randperm(self.size, generator=self.generator), 0
        batch = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return batch

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.position = state["order"], state["position"]


def share_of_rank(n: int, rank: int, world_size: int) -> slice:
    """A process's contiguous share of n items (a batch's images, meta-training's tasks): shares differ by at most
    one."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def draw_split(
    name: str,
    split: str,
    per_class: dict[str, int],
    class_names: list[str],
    draw: Callable[[int, np.random.Generator], np.ndarray],
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images, labels, class names) of a dataset drawn image by image, `draw(label, rng)` `per_class[split]` times
    per class, each class from its own seed: a split is the same images on every machine."""
    if split not in per_class:
        raise ValueError(f"{name} has the splits {' and '.join(map(repr, per_class))}, not '{split}'")
    images, labels = [], []
    for label in range(len(class_names)):
        rng = np.random.default_rng(seed_for(name, split, seed, label) % 2**63)
        images += [draw(label, rng) for _ in range(per_class[split])]
        labels += [label] * per_class[split]
    return np.stack(images), np.array(labels), class_names


def seed_for(*parts: object) -> int:
    """A 63-bit seed from any tuple of values, the same in every process."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") >> 1
