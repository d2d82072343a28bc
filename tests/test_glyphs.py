"""The rendered-letter datasets: reproducible, test fonts disjoint from training fonts, targets disjoint from
sources, no Latin letters or Arabic numerals, and a clear error where a font is missing."""

import numpy as np
import pytest

from timm_metaperturb.training import glyphs
from timm_metaperturb.training.data import load_image_dataset, to_tensors
from timm_metaperturb.training.target import TargetConfig, prepare_data


def thai_fonts_installed() -> bool:
    try:
        return all(glyphs.font_path(f) for f in glyphs.SCRIPTS["thai"].train_fonts + glyphs.SCRIPTS["thai"].test_fonts)
    except FileNotFoundError:
        return False


needs_fonts = pytest.mark.skipif(not thai_fonts_installed(), reason="Thai fonts missing: apt-get install fonts-tlwg-*")


def test_scripts_keep_targets_sources_and_held_out_letters_apart():
    targets = {c for s in glyphs.SCRIPTS.values() if s.role == "target" for c in s.codepoints}
    sources = {c for s in glyphs.SCRIPTS.values() if s.role == "source" for c in s.codepoints}
    assert targets and sources and not targets & sources
    assert not {c for c in targets | sources if c < 0x0530}, "no Latin, Greek or Cyrillic letters, no digits"
    for name, script in glyphs.SCRIPTS.items():
        assert not set(script.train_fonts) & set(script.test_fonts), name
        assert len(set(script.codepoints)) == len(script.codepoints) >= 20, name
    assert {glyphs.SCRIPTS[n.removeprefix("glyphs-")].role for n in glyphs.builtin_names("target")} == {"target"}


@needs_fonts
def test_a_split_is_reproducible_and_its_test_letters_come_from_other_fonts():
    images, labels = glyphs.render_split("thai", "train")
    again, _ = glyphs.render_split("thai", "train")
    other_seed, _ = glyphs.render_split("thai", "train", seed=1)
    assert images.shape == (46 * glyphs.TRAIN_PER_CLASS, glyphs.CANVAS, glyphs.CANVAS) and images.dtype == np.uint8
    assert np.array_equal(images, again) and not np.array_equal(images, other_seed)
    assert np.bincount(labels).tolist() == [glyphs.TRAIN_PER_CLASS] * 46
    assert (images.reshape(len(images), -1).max(1) == 255).all(), "every image holds a letter"
    # the same letter, drawn without randomness by a training and a test font, differs more than two training fonts
    script = glyphs.SCRIPTS["thai"]
    fonts = [*script.train_fonts[:2], script.test_fonts[2]]
    letter = chr(script.codepoints[0])
    train_a, train_b, test = (glyphs.render(letter, f, np.random.default_rng(0)).astype(float) for f in fonts)
    assert np.abs(train_a - test).mean() > np.abs(train_a - train_b).mean()


@needs_fonts
def test_a_glyph_target_trains_like_any_dataset():
    ds = load_image_dataset("glyphs-thai", "test")
    assert len(ds) == 46 * glyphs.TEST_PER_CLASS and ds.features["label"].names[0] == "U+0E01"
    assert to_tensors(ds, 16).images.shape == (len(ds), 3, 16, 16)
    train, test = prepare_data(TargetConfig(dataset="glyphs-thai", max_per_class=15, image_size=16))
    assert (len(train), len(test), len(train.class_names)) == (690, 1380, 46)
    with pytest.raises(ValueError, match=r"'train' .* and 'test'"):
        load_image_dataset("glyphs-thai", "validation")
    with pytest.raises(ValueError, match="choose from glyphs-hebrew"):
        load_image_dataset("glyphs-klingon")


def test_a_missing_font_names_the_package_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(glyphs, "FONT_DIRS", (tmp_path,))
    glyphs.font_path.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="apt-get install fonts-tlwg-garuda"):
            glyphs.render_split("thai", "train")
    finally:
        glyphs.font_path.cache_clear()


@needs_fonts
def test_glyphs_sources_joins_every_source_script_with_its_own_labels(monkeypatch):
    thai = glyphs.SCRIPTS["thai"]
    first, second = (
        glyphs.Script(thai.codepoints[i::2][:20], thai.train_fonts, thai.test_fonts, "source") for i in (0, 1)
    )
    monkeypatch.setattr(glyphs, "SCRIPTS", {"first": first, "second": second, "thai": thai})
    ds = load_image_dataset("glyphs-sources", "train")
    names = ds.features["label"].names
    assert len(names) == 40 and names[0] == "first U+0E01" and names[20] == "second U+0E02"
    labels = np.asarray(ds["label"])
    assert np.bincount(labels).tolist() == [glyphs.TRAIN_PER_CLASS] * 40
    second_images, _ = glyphs.render_split("second", "train")
    assert np.array_equal(np.asarray(ds.with_format("numpy")["image"])[labels >= 20], second_images)
