"""An offline colour dataset drawn procedurally: a meta-training source of another domain than letters.

Each class is a shape (8 kinds) filled with a pattern (4 kinds), 32 classes; colours, size, turn and place are
drawn at random for every image, so that only shape and pattern tell the classes apart. Training images lie on
flat backgrounds, test images on gradients with pixel noise (a style shift, as in the glyph targets). Everything is
drawn from a seed: a split is the same images on every machine. `load_image_dataset("shapes")` returns it as a
`datasets.Dataset`. No target is drawn from it, so that φs meta-trained on it share no classes with a target.
"""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

CANVAS = 64
SUPERSAMPLE = 2  # shapes are drawn at twice the size and shrunk, for smooth edges
PER_CLASS = {"train": 40, "test": 30}
SHAPES = ("triangle", "square", "pentagon", "hexagon", "circle", "star", "cross", "crescent")
FILLS = ("solid", "stripes", "checks", "outline")
NAME = "shapes"
_Y, _X = np.mgrid[0 : CANVAS * SUPERSAMPLE, 0 : CANVAS * SUPERSAMPLE].astype(float)  # pixel coordinates of a mask


def class_names() -> list[str]:
    return [f"{shape} {fill}" for shape in SHAPES for fill in FILLS]


def _polygon(n: int, radius: float, angle: float, inner: float | None = None) -> list[tuple[float, float]]:
    """A regular n-gon (or an n-pointed star with `inner` radius) around the canvas centre."""
    centre, points = CANVAS * SUPERSAMPLE / 2, []
    corners = 2 * n if inner else n
    for i in range(corners):
        r = inner if inner and i % 2 else radius
        t = angle + 2 * np.pi * i / corners
        points.append((centre + r * np.cos(t), centre + r * np.sin(t)))
    return points


def _mask(shape: str, radius: float, angle: float) -> Image.Image:
    """The shape, white on black, at SUPERSAMPLE times the canvas."""
    size, centre = CANVAS * SUPERSAMPLE, CANVAS * SUPERSAMPLE / 2
    mask = Image.new("L", (size, size))
    draw = ImageDraw.Draw(mask)
    disc = (centre - radius, centre - radius, centre + radius, centre + radius)
    if shape in ("triangle", "square", "pentagon", "hexagon"):
        draw.polygon(_polygon(SHAPES.index(shape) + 3, radius, angle), fill=255)
    elif shape == "circle":
        draw.ellipse(disc, fill=255)
    elif shape == "star":
        draw.polygon(_polygon(5, radius, angle, inner=0.45 * radius), fill=255)
    elif shape == "cross":
        arm = 0.38 * radius
        draw.rectangle((centre - radius, centre - arm, centre + radius, centre + arm), fill=255)
        draw.rectangle((centre - arm, centre - radius, centre + arm, centre + radius), fill=255)
        mask = mask.rotate(np.rad2deg(angle), resample=Image.Resampling.BILINEAR)
    else:  # crescent: a disc less a shifted disc
        draw.ellipse(disc, fill=255)
        dx, dy = 0.45 * radius * np.cos(angle), 0.45 * radius * np.sin(angle)
        draw.ellipse((disc[0] + dx, disc[1] + dy, disc[2] + dx, disc[3] + dy), fill=0)
    return mask


def _pattern(fill: str, mask: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Where the foreground colour goes: the mask itself, or the mask times stripes, checks, or its rim."""
    if fill == "solid":
        return mask
    if fill == "outline":
        width = 2 * int(rng.integers(3, 6)) * SUPERSAMPLE + 1
        return ImageChops.subtract(mask, mask.filter(ImageFilter.MinFilter(width)))
    t = rng.uniform(0, np.pi)
    u, v = _X * np.cos(t) + _Y * np.sin(t), -_X * np.sin(t) + _Y * np.cos(t)
    period = rng.uniform(8, 13) * SUPERSAMPLE
    on = (u % period) < period / 2
    if fill == "checks":
        on = on ^ ((v % period) < period / 2)
    return ImageChops.multiply(mask, Image.fromarray((on * 255).astype(np.uint8)))


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background colours (RGB in [0, 255]) of different hue and brightness."""
    hue, value = rng.uniform(0, 1), rng.uniform(0.1, 0.9)
    other = value + rng.uniform(0.35, 0.6) * (1 if value < 0.5 else -1)
    fg = colorsys.hsv_to_rgb(hue, rng.uniform(0.4, 1), other)
    bg = colorsys.hsv_to_rgb((hue + rng.uniform(0.25, 0.75)) % 1, rng.uniform(0, 1), value)
    return np.array(fg) * 255, np.array(bg) * 255


def render(shape: str, fill: str, split: str, rng: np.random.Generator) -> np.ndarray:
    """One image, CANVAS x CANVAS x 3 uint8: the shape (radius 0.25-0.42 of the canvas, any turn, moved up to 6 px)
    in its pattern; a flat background for "train", a gradient with pixel noise for "test"."""
    radius = rng.uniform(0.25, 0.42) * CANVAS * SUPERSAMPLE
    mask = _mask(shape, radius, rng.uniform(0, 2 * np.pi))
    shift = tuple(int(s) for s in rng.integers(-6, 7, size=2) * SUPERSAMPLE)
    where = _pattern(fill, mask, rng).transform(mask.size, Image.Transform.AFFINE, (1, 0, -shift[0], 0, 1, -shift[1]))
    alpha = np.asarray(where.resize((CANVAS, CANVAS), Image.Resampling.BOX), dtype=float)[..., None] / 255
    fg, bg = _colours(rng)
    background = np.broadcast_to(bg, (CANVAS, CANVAS, 3)).astype(float)
    if split == "test":
        ramp = np.linspace(-1, 1, CANVAS)
        direction = rng.uniform(0, 2 * np.pi)
        gradient = np.cos(direction) * ramp[None, :] + np.sin(direction) * ramp[:, None]
        background = background + 50 * gradient[..., None] + rng.normal(0, 12, (CANVAS, CANVAS, 3))
    image = alpha * fg + (1 - alpha) * background
    return image.round().clip(0, 255).astype(np.uint8)


def render_split(split: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images (N, CANVAS, CANVAS, 3) uint8, labels (N,), class names) of "train" (flat backgrounds) or "test"
    (noisy gradients), for `load_image_dataset`."""
    from .data import draw_split

    names = class_names()
    return draw_split(NAME, split, PER_CLASS, names, lambda label, rng: render(*names[label].split(), split, rng), seed)
