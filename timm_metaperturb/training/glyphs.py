"""Offline many-class datasets: the letters of one script rendered from Debian's fonts, test fonts unlike training.

A target shaped like a user's data rather than like the benchmarks φ was tuned on: 27 to 92 classes, few images
per class, and test images in a style the network never trained on (serif or handwritten fonts at test time,
sans-serif at training time). Each image is one letter on a black 64 x 64 canvas, moved, turned, sheared and
scaled at random; everything is drawn from a seed, so a split is the same images on every machine with the same
fonts. `load_image_dataset("glyphs-thai")` etc. returns one as a `datasets.Dataset`.

Scripts are either targets or meta-training sources, never both, so that no target shares classes with a φ
meta-trained on these sources. Latin letters and Arabic numerals are in neither (nor Greek or Cyrillic, whose letters
include Latin shapes): they stay held out.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from fontTools.ttLib import TTFont
from PIL import Image, ImageDraw, ImageFont

FONT_DIRS = (Path("/usr/share/fonts"),)
CANVAS = 64
TRAIN_PER_CLASS = 40  # per class, spread over the training fonts; a target keeps fewer with --max-per-class
TEST_PER_CLASS = 30


@dataclass(frozen=True)
class Script:
    """Classes (code points) and disjoint training and test fonts (file names, with the Debian package of each)."""

    codepoints: tuple[int, ...]
    train_fonts: tuple[str, ...]
    test_fonts: tuple[str, ...]
    role: str  # "target" or "source"


def _span(first: int, last: int) -> tuple[int, ...]:
    return tuple(range(first, last + 1))


def _letters(text: str) -> tuple[int, ...]:
    return tuple(map(ord, text))


PACKAGES = {  # the Debian package that ships each font file
    "Garuda.ttf": "fonts-tlwg-garuda", "Loma.ttf": "fonts-tlwg-loma", "Umpush.ttf": "fonts-tlwg-umpush",
    "Waree.ttf": "fonts-tlwg-waree", "Kinnari.ttf": "fonts-tlwg-kinnari", "Norasi.ttf": "fonts-tlwg-norasi",
    "Purisa.ttf": "fonts-tlwg-purisa", "Sawasdee.ttf": "fonts-tlwg-sawasdee",
    "ipag.ttf": "fonts-ipafont-gothic", "ipagp.ttf": "fonts-ipafont-gothic", "ipam.ttf": "fonts-ipafont-mincho",
    "ipamp.ttf": "fonts-ipafont-mincho", "Lohit-Devanagari.ttf": "fonts-lohit-deva",
    "Samyak-Devanagari.ttf": "fonts-samyak-deva", "AbyssinicaSIL-Regular.ttf": "fonts-sil-abyssinica",
    "FreeSans.ttf": "fonts-freefont-ttf", "FreeSerif.ttf": "fonts-freefont-ttf",
    "DejaVuSans.ttf": "fonts-dejavu-core", "DejaVuSerif.ttf": "fonts-dejavu-core",
}  # fmt: skip
NOTO = "fonts-noto-core"  # every Noto*.ttf above is in it

SCRIPTS = {
    # targets: sans-serif at training time, serif, handwritten or brush styles at test time
    "hebrew": Script(
        _span(0x05D0, 0x05EA),
        ("DejaVuSans.ttf", "FreeSans.ttf", "NotoSansHebrew-Regular.ttf"),
        ("FreeSerif.ttf", "NotoSerifHebrew-Regular.ttf", "NotoRashiHebrew-Regular.ttf"),
        "target",
    ),
    "georgian": Script(
        _span(0x10D0, 0x10F0),
        ("DejaVuSans.ttf", "FreeSans.ttf", "NotoSansGeorgian-Regular.ttf"),
        ("DejaVuSerif.ttf", "FreeSerif.ttf", "NotoSerifGeorgian-Regular.ttf"),
        "target",
    ),
    "thai": Script(
        _span(0x0E01, 0x0E2E),
        ("Garuda.ttf", "Loma.ttf", "Umpush.ttf", "Waree.ttf"),
        ("Kinnari.ttf", "Norasi.ttf", "Purisa.ttf", "Sawasdee.ttf"),
        "target",
    ),
    "devanagari": Script(
        _letters("अआइईउऊऋएऐओऔकखगघङचछजझञटठडढणतथदधनपफबभमयरलवशषसह"),
        ("Lohit-Devanagari.ttf", "NotoSansDevanagari-Regular.ttf", "FreeSans.ttf"),
        ("NotoSerifDevanagari-Regular.ttf", "Samyak-Devanagari.ttf", "FreeSerif.ttf"),
        "target",
    ),
    "ethiopic": Script(
        tuple(c for c in _span(0x1200, 0x1246) if c != 0x1207),  # FreeSerif lacks U+1207
        ("NotoSansEthiopic-Regular.ttf", "AbyssinicaSIL-Regular.ttf"),
        ("NotoSerifEthiopic-Regular.ttf", "FreeSerif.ttf"),
        "target",
    ),
    "kana": Script(
        _letters("あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをん")
        + _letters("アイウエオカキクケコサシスセソタチツテトナニヌネノハヒフヘホマミムメモヤユヨラリルレロワヲン"),
        ("ipag.ttf", "ipagp.ttf"),
        ("ipam.ttf", "ipamp.ttf"),
        "target",
    ),
    # sources for meta-training φ: other scripts, never a target's
    "armenian": Script(
        _span(0x0531, 0x0556),
        ("DejaVuSans.ttf", "FreeSans.ttf", "NotoSansArmenian-Regular.ttf"),
        ("DejaVuSerif.ttf", "FreeSerif.ttf", "NotoSerifArmenian-Regular.ttf"),
        "source",
    ),
    "tamil": Script(
        _letters("அஆஇஈஉஊஎஏஐஒஓஔகஙசஞடணதநபமயரலவழளறனஜஷஸஹ"),
        ("NotoSansTamil-Regular.ttf",),
        ("NotoSerifTamil-Regular.ttf", "FreeSerif.ttf"),
        "source",
    ),
    "bengali": Script(
        _letters("অআইঈউঊঋএঐওঔকখগঘঙচছজঝঞটঠডঢণতথদধনপফবভমযরলশষসহ"),
        ("NotoSansBengali-Regular.ttf", "FreeSans.ttf"),
        ("NotoSerifBengali-Regular.ttf", "FreeSerif.ttf"),
        "source",
    ),
    "malayalam": Script(
        _letters("അആഇഈഉഊഋഎഏഐഒഓഔകഖഗഘങചഛജഝഞടഠഡഢണതഥദധനപഫബഭമയരലവശഷസഹളഴറ"),
        ("NotoSansMalayalam-Regular.ttf", "FreeSans.ttf"),
        ("NotoSerifMalayalam-Regular.ttf", "FreeSerif.ttf"),
        "source",
    ),
    "gurmukhi": Script(
        _letters("ੳਅੲਸਹਕਖਗਘਙਚਛਜਝਞਟਠਡਢਣਤਥਦਧਨਪਫਬਭਮਯਰਲਵੜ"),
        ("NotoSansGurmukhi-Regular.ttf", "FreeSans.ttf"),
        ("NotoSerifGurmukhi-Regular.ttf", "FreeSerif.ttf"),
        "source",
    ),
    "lao": Script(
        _letters("ກຂຄງຈສຊຍດຕຖທນບປຜຝພຟມຢຣລວຫອຮ"),
        ("DejaVuSans.ttf", "NotoSansLao-Regular.ttf"),
        ("NotoSerifLao-Regular.ttf", "NotoLoopedLao-Regular.ttf"),
        "source",
    ),
}


SOURCES = "sources"  # glyphs-sources: every source script in one dataset (226 classes), for meta-training


def builtin_names(role: str | None = None) -> list[str]:
    names = [f"glyphs-{name}" for name, script in SCRIPTS.items() if role in (None, script.role)]
    return names + ([f"glyphs-{SOURCES}"] if role in (None, "source") else [])


@cache
def font_path(name: str) -> Path:
    """A font file found under FONT_DIRS, or an error naming the Debian package that ships it."""
    for root in FONT_DIRS:
        found = sorted(root.rglob(name)) if root.is_dir() else []
        if found:
            return found[0]
    package = PACKAGES.get(name, NOTO if name.startswith("Noto") else "the package that ships it")
    raise FileNotFoundError(f"font {name} not found under {', '.join(map(str, FONT_DIRS))}: apt-get install {package}")


@cache
def _font(name: str, size: int):
    return ImageFont.truetype(str(font_path(name)), size)


def _check_coverage(name: str, codepoints: tuple[int, ...]) -> None:
    """Every class must be a real glyph of the font, not its 'missing glyph' box."""
    cmap = TTFont(str(font_path(name)), lazy=True).getBestCmap()
    missing = [f"U+{c:04X}" for c in codepoints if c not in cmap]
    if missing:
        raise ValueError(f"font {name} lacks {len(missing)} of the script's letters: {', '.join(missing[:8])}")


def render(char: str, font: str, rng: np.random.Generator) -> np.ndarray:
    """One letter, white on black, CANVAS x CANVAS uint8: centred by its ink, then scaled (its larger side 0.6-0.85 of
    the canvas), turned (±12°), sheared (±0.25) and moved (±4 px) at random."""
    face = _font(font, CANVAS)
    canvas = Image.new("L", (2 * CANVAS, 2 * CANVAS))
    ImageDraw.Draw(canvas).text((CANVAS // 2, CANVAS // 2), char, fill=255, font=face)
    box = canvas.getbbox()
    if box is None:
        raise ValueError(f"font {font} draws nothing for U+{ord(char):04X}")
    left, top, right, bottom = box
    scale = rng.uniform(0.6, 0.85) * CANVAS / max(right - left, bottom - top)
    angle, shear = np.deg2rad(rng.uniform(-12, 12)), rng.uniform(-0.25, 0.25)
    shift = rng.uniform(-4, 4, size=2)
    # output pixel p maps to input centre + A^-1 (p - canvas centre - shift), A = rotation @ shear @ scale
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    forward = rotation @ np.array([[1.0, shear], [0.0, 1.0]]) * scale
    inverse = np.linalg.inv(forward)
    centre = np.array([(left + right) / 2, (top + bottom) / 2])
    offset = centre - inverse @ (np.array([CANVAS / 2, CANVAS / 2]) + shift)
    coefficients = (*inverse[0], offset[0], *inverse[1], offset[1])
    image = canvas.transform((CANVAS, CANVAS), Image.Transform.AFFINE, coefficients, Image.Resampling.BILINEAR)
    return np.asarray(image)


def render_split(script: str, split: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, CANVAS, CANVAS) uint8, labels (N,)) of one split: "train" from the training fonts,
    TRAIN_PER_CLASS images per class, "test" from the test fonts, TEST_PER_CLASS; the fonts take turns."""
    from .data import seed_for

    spec = SCRIPTS[script]
    fonts, per_class = {"train": (spec.train_fonts, TRAIN_PER_CLASS), "test": (spec.test_fonts, TEST_PER_CLASS)}[split]
    for font in fonts:
        _check_coverage(font, spec.codepoints)
    images, labels = [], []
    for label, codepoint in enumerate(spec.codepoints):
        rng = np.random.default_rng(seed_for("glyphs", script, split, seed, codepoint) % 2**63)
        for i in range(per_class):
            images.append(render(chr(codepoint), fonts[i % len(fonts)], rng))
            labels.append(label)
    return np.stack(images), np.array(labels)


def render_builtin(name: str, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The built-in `glyphs-<script>` (or `glyphs-sources`, every source script): images, labels and class names
    (code points), for `load_image_dataset`."""
    script = name.removeprefix("glyphs-")
    scripts = [n for n, s in SCRIPTS.items() if s.role == "source"] if script == SOURCES else [script]
    if script != SOURCES and script not in SCRIPTS:
        raise ValueError(f"unknown glyph dataset '{name}'; choose from {', '.join(builtin_names())}")
    if split not in ("train", "test"):
        raise ValueError(f"{name} has the splits 'train' (training fonts) and 'test' (other fonts), not '{split}'")
    images, labels, names = [], [], []
    for each in scripts:
        rendered, classes = render_split(each, split)
        images.append(rendered)
        labels.append(classes + len(names))
        names += [f"{each} U+{c:04X}" if len(scripts) > 1 else f"U+{c:04X}" for c in SCRIPTS[each].codepoints]
    return np.concatenate(images), np.concatenate(labels), names
