"""Corrupted test sets: imagecorruptions' 15 types on the current stack, seeded, grey kept grey, bad input refused."""

import sys

import numpy as np
import pytest
import torch

from timm_metaperturb.training.corruptions import (
    CORRUPTIONS,
    FAMILIES,
    corrupt,
    corrupt_each,
    corruption_types,
    reference_package,
)


@pytest.fixture(scope="module")
def grey():
    """Six grey 32 px images with structure (a bright square on a gradient), three equal channels."""
    ramp = torch.linspace(20, 120, 32).expand(32, 32)
    images = ramp.repeat(6, 1, 1).clone()
    for i in range(6):
        images[i, 4 + i : 20 + i, 6:22] = 230
    return images.round().to(torch.uint8)[:, None].expand(-1, 3, -1, -1).contiguous()


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_every_type_runs_seeded_keeps_grey_and_grows_with_severity(grey, name):
    mild, severe = corrupt(grey, name, 1), corrupt(grey, name, 5)
    assert mild.shape == severe.shape == grey.shape and severe.dtype == torch.uint8
    assert bool((severe == severe[:, :1]).all()), "a grey image comes back grey"
    change = [(x.float() - grey.float()).abs().mean().item() for x in (mild, severe)]
    assert 0 < change[0] < change[1], f"{name}: severity 5 should change the images more than 1, got {change}"
    assert torch.equal(corrupt(grey, name, 5), severe), "the same set, seed and severity give the same images"


def test_the_families_are_the_reference_codes(grey):
    package = reference_package()
    assert {family: list(names) for family, names in FAMILIES.items()} == {
        family: package.get_corruption_names(family) for family in FAMILIES
    }
    assert "pkg_resources" not in sys.modules or hasattr(sys.modules["pkg_resources"], "working_set")
    assert not hasattr(np, "float_"), "the bridge for the reference code must not change NumPy itself"


def test_seed_draws_another_set_and_one_channel_and_colour_keep_their_layout(grey):
    assert not torch.equal(corrupt(grey, "gaussian_noise", 3, seed=1), corrupt(grey, "gaussian_noise", 3, seed=0))
    one = corrupt(grey[:, :1], "impulse_noise", 3)
    assert one.shape == (6, 1, 32, 32) and torch.equal(one, corrupt(grey, "impulse_noise", 3)[:, :1])
    colour = grey.clone()
    colour[:, 0] = 200
    out = corrupt(colour, "fog", 2)
    assert out.shape == colour.shape and not bool((out == out[:, :1]).all()), "colour images stay colour"


def test_bad_input_is_refused_with_what_to_do(grey):
    with pytest.raises(ValueError, match="at least 32 px"):
        corrupt(grey[:, :, :28, :28], "contrast", 1)
    with pytest.raises(ValueError, match="unknown corruption 'rain'"):
        corrupt(grey, "rain", 1)
    with pytest.raises(ValueError, match="severity 6"):
        corrupt(grey, "contrast", 6)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(grey.float(), "contrast", 1)


def test_sets_are_made_once_and_read_back_from_the_cache(grey, tmp_path, monkeypatch):
    from timm_metaperturb.training import corruptions

    made = corruptions.corrupted_sets(grey, cache=tmp_path)
    assert len(made) == len(CORRUPTIONS) * 5 and made[("fog", 3)].shape == grey.shape
    assert len(list(tmp_path.rglob("*.pt"))) == len(CORRUPTIONS)
    assert all(p.stat().st_size < grey.numel() * 5 // 2 for p in tmp_path.rglob("*.pt")), "grey kept as one channel"

    def refuse(*args, **kwargs):
        raise RuntimeError("a set was made again")

    monkeypatch.setattr(corruptions, "corrupt", refuse)
    again = corruptions.corrupted_sets(grey, cache=tmp_path)
    assert all(torch.equal(again[k], made[k]) for k in made)
    other = grey.clone()
    other[0, :, 0, 0] += 1
    with pytest.raises(RuntimeError, match="made again"):  # other images are another set
        corruptions.corrupted_sets(other, cache=tmp_path)


def test_families_and_types_name_the_types_once_and_bad_names_are_refused():
    assert corruption_types("noise, motion_blur,shot_noise") == ["gaussian_noise", "shot_noise", "impulse_noise",
                                                                 "motion_blur"]  # fmt: skip
    with pytest.raises(ValueError, match=r"unknown corruption type or family 'rain'.*families noise"):
        corruption_types("noise,rain")
    with pytest.raises(ValueError, match="no corruption type"):
        corruption_types(" , ")


def test_corrupt_each_draws_one_type_and_severity_per_image(grey):
    images = grey.repeat(5, 1, 1, 1)  # 30 images
    once = corrupt_each(images, ["gaussian_noise", "contrast"], seed=3)
    assert torch.equal(once, corrupt_each(images, ["gaussian_noise", "contrast"], seed=3)), "seeded"
    assert not torch.equal(once, corrupt_each(images, ["gaussian_noise", "contrast"], seed=4))
    assert bool((once != images).flatten(1).any(1).all()), "every image is corrupted"

    def roughness(x):
        return (x[..., 1:].float() - x[..., :-1].float()).abs().flatten(1).mean(1)

    noisy = roughness(once) > roughness(images)  # noise roughens an image, lower contrast smooths it
    assert 0 < int(noisy.sum()) < len(images), "both types are drawn"
