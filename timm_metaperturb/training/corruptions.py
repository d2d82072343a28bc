"""Corrupted copies of a test set, made by `imagecorruptions` (the reference code of ImageNet-C and CIFAR-10-C,
Hendrycks & Dietterich 2019): its 15 common types in four families, at 5 severities.

Each (type, severity) set is drawn from its own seed, so every row of a table sees the same corrupted images, and a
set made again, or alone, is the same set. A grey test set stays grey: the corruption runs on the image as three
equal channels (as the reference code does) and its channels are averaged back to one.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .data import seed_for

FAMILIES = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}
CORRUPTIONS = tuple(name for names in FAMILIES.values() for name in names)
SEVERITIES = (1, 2, 3, 4, 5)
MIN_SIZE = 32  # the reference code refuses smaller images


class _NumPyWithFloat(types.ModuleType):
    """NumPy as the reference code expects it: with `np.float_` (removed in NumPy 2), for that module alone."""

    float_ = np.float64

    def __getattr__(self, name: str):
        return getattr(np, name)


def _gaussian_with_multichannel(image, sigma, multichannel: bool = False, **kwargs):
    """scikit-image's `gaussian` under its old signature (`multichannel` became `channel_axis`)."""
    from skimage.filters import gaussian

    return gaussian(image, sigma=sigma, channel_axis=-1 if multichannel else None, **kwargs)


class _SkimageSeeded(types.ModuleType):
    """scikit-image whose `util.random_noise` draws its generator's seed from NumPy's global one, which the other
    types use: without it impulse noise would differ on every call (it takes a fresh unseeded generator)."""

    def __init__(self) -> None:
        import skimage
        import skimage.color
        import skimage.util

        super().__init__("skimage")
        self._skimage = skimage
        self.util = types.SimpleNamespace(random_noise=self._random_noise)

    def __getattr__(self, name: str):
        return getattr(self._skimage, name)

    def _random_noise(self, image, **kwargs):
        return self._skimage.util.random_noise(image, rng=np.random.randint(2**31), **kwargs)


def _module_file(module: str, name: str) -> str:
    """`pkg_resources.resource_filename`: a file shipped beside `module`."""
    return str(Path(importlib.util.find_spec(module).origin).parent / name)


def reference_package():
    """`imagecorruptions`, working on the current stack. Its last release (1.1.2) needs three things
    that have since gone: `pkg_resources` (setuptools 81), `multichannel=` in scikit-image and `np.float_`; each is
    given to that module alone, and nothing else in the process changes. Its impulse noise is made seedable."""
    if "imagecorruptions" not in sys.modules:
        shim = None
        if importlib.util.find_spec("pkg_resources") is None:
            shim = types.ModuleType("pkg_resources")
            shim.resource_filename = _module_file
            sys.modules["pkg_resources"] = shim  # read once, by the import below
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # scipy.ndimage.interpolation
                importlib.import_module("imagecorruptions")
        except ImportError as error:
            raise ImportError(
                "the corrupted test sets need imagecorruptions: pip install 'timm-metaperturb[robustness]'"
            ) from error
        finally:
            if shim is not None:
                del sys.modules["pkg_resources"]
    module = sys.modules["imagecorruptions.corruptions"]
    module.np = _NumPyWithFloat("numpy")
    module.gaussian = _gaussian_with_multichannel
    module.sk = _SkimageSeeded()
    return sys.modules["imagecorruptions"]


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """`images` (uint8, N x C x H x W, C = 1 or 3, at least 32 px) corrupted by type `name` at `severity`; grey
    images (one channel, or three equal ones) come back grey in the same layout."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity {severity} is not one of {SEVERITIES}")
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images N x C x H x W, C = 1 or 3; got {images.dtype} {tuple(images.shape)}")
    if min(images.shape[2:]) < MIN_SIZE:
        raise ValueError(f"images of {tuple(images.shape[2:])} px are too small: the corruptions need at least "
                         f"{MIN_SIZE} px, resize them first (train/target.py --image-size)")  # fmt: skip
    reference = reference_package()
    grey = images.shape[1] == 1 or bool((images == images[:, :1]).all())
    rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    state = np.random.get_state()  # the reference code draws from NumPy's global generator: seed it, then restore
    np.random.seed(seed_for("corruption", name, severity, seed) % 2**32)
    try:
        out = [reference.corrupt(image, severity, name) for image in rgb.permute(0, 2, 3, 1).numpy()]
    finally:
        np.random.set_state(state)
    out = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
    if grey:
        out = out.float().mean(dim=1, keepdim=True).round().to(torch.uint8).expand(-1, images.shape[1], -1, -1)
    return out.contiguous()


def corruption_types(names: str) -> list[str]:
    """The types named in a comma-separated list of types and families, e.g. "noise,motion_blur"."""
    types = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name not in FAMILIES and name not in CORRUPTIONS:
            raise ValueError(f"unknown corruption type or family {name!r}: choose from the families "
                             f"{', '.join(FAMILIES)} or the types {', '.join(CORRUPTIONS)}")  # fmt: skip
        types += [t for t in FAMILIES.get(name, (name,)) if t not in types]
    if not types:
        raise ValueError("no corruption type named: give types or families, e.g. noise,blur")
    return types


def corrupt_each(images: torch.Tensor, types: list[str], seed: int) -> torch.Tensor:
    """Every image corrupted once, by a type from `types` and a severity drawn for it from `seed`: a set with
    every type and severity in it, the same for the same seed (meta-training's corrupted validation images)."""
    generator = torch.Generator().manual_seed(seed % 2**63)
    kind = torch.randint(len(types), (len(images),), generator=generator)
    severity = torch.randint(1, len(SEVERITIES) + 1, (len(images),), generator=generator)
    out = images.clone()
    for k, name in enumerate(types):
        for level in SEVERITIES:
            chosen = torch.nonzero((kind == k) & (severity == level)).flatten()
            if len(chosen):
                out[chosen] = corrupt(images[chosen], name, level, seed_for(seed, name, level))
    return out


def cache_dir() -> Path:
    """Where corrupted test sets are kept: $TIMM_METAPERTURB_CACHE/corruptions, else under ~/.cache."""
    root = os.environ.get("TIMM_METAPERTURB_CACHE") or Path.home() / ".cache" / "timm_metaperturb"
    return Path(root) / "corruptions"


def held_out_subset(count: int, total: int) -> torch.Tensor:
    """The positions of the `count` test images that are corrupted: a fixed random subset, in test-set order."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(0))[: min(count, total)].sort().values


def corrupted_sets(images: torch.Tensor, seed: int = 0, cache: Path | None = None) -> dict[tuple[str, int], Tensor]:
    """Every corruption type at every severity of `images` (uint8, N x C x H x W), keyed (type, severity); made once
    per set of images and seed and kept in `cache` (default `cache_dir()`), one file per type."""
    key = hashlib.sha256(images.numpy().tobytes() + repr((tuple(images.shape), seed)).encode()).hexdigest()[:20]
    folder = (cache or cache_dir()) / key
    sets = {}
    for name in CORRUPTIONS:
        path = folder / f"{name}.pt"
        if path.is_file():
            stacked = torch.load(path, weights_only=True)
        else:
            stacked = torch.stack([corrupt(images, name, severity, seed) for severity in SEVERITIES])
            grey = bool((stacked == stacked[:, :, :1]).all())
            folder.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.partial")  # two runs making the same set write in turn
            torch.save(stacked[:, :, :1].clone() if grey else stacked, partial)  # grey sets kept as one channel
            os.replace(partial, path)
        shape, channels = tuple(stacked.shape), images.shape[1]
        wanted = (len(SEVERITIES), len(images), *images.shape[2:])
        if (*shape[:2], *shape[3:]) != wanted or shape[2] not in (1, channels):
            raise ValueError(f"{path} holds images of shape {shape[1:]}, not {tuple(images.shape)}: "
                             "delete it to make it again")  # fmt: skip
        stacked = stacked.expand(-1, -1, channels, -1, -1)
        sets.update({(name, severity): stacked[i] for i, severity in enumerate(SEVERITIES)})
    return sets
