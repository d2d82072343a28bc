"""φ on disk: safetensors and config.json, loaded strictly."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from timm_metaperturb import MetaPerturb


def test_folder_and_file_round_trip_is_bit_exact(tmp_path, phi):
    phi.save_pretrained(tmp_path / "phi")
    config = json.loads((tmp_path / "phi" / "config.json").read_text())
    assert config == {"format_version": 1, **phi.config, "provenance": {}}
    for source in (tmp_path / "phi", tmp_path / "phi" / "model.safetensors"):
        loaded = MetaPerturb.from_pretrained(source)
        assert loaded.config == phi.config
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in phi.state_dict().items())


def test_config_travels_with_the_weights(tmp_path):
    phi = MetaPerturb(h_dim=2, kernel_size=5, channel_norm=512, spatial_norm=224, clip=50)
    phi.save_pretrained(tmp_path / "phi")
    loaded = MetaPerturb.from_pretrained(tmp_path / "phi")
    assert loaded.config == phi.config and loaded.scale_kernels.shape == (2, 1, 5, 5)


def test_missing_extra_and_mis_shaped_tensors_fail(tmp_path, phi):
    phi.save_pretrained(tmp_path / "phi")
    weights = tmp_path / "phi" / "model.safetensors"
    state = load_file(weights)
    metadata = {"config": json.dumps(phi.config)}

    broken = dict(state)
    del broken["scale_kernels"]
    save_file(broken, weights, metadata=metadata)
    with pytest.raises(ValueError, match="missing: scale_kernels"):
        MetaPerturb.from_pretrained(tmp_path / "phi")

    save_file({**state, "extra": torch.zeros(1)}, weights, metadata=metadata)
    with pytest.raises(ValueError, match="unexpected: extra"):
        MetaPerturb.from_pretrained(tmp_path / "phi")

    save_file({**state, "scale_fc.weight": torch.zeros(1, 12)}, weights, metadata=metadata)
    with pytest.raises(ValueError, match=r"mis-shaped: scale_fc.weight: \(1, 12\) \(expected \(1, 10\)\)"):
        MetaPerturb.from_pretrained(tmp_path / "phi")


def test_corrupt_file_fails_clearly(tmp_path, phi):
    phi.save_pretrained(tmp_path / "phi")
    weights = tmp_path / "phi" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(ValueError, match="could not read φ weights"):
        MetaPerturb.from_pretrained(tmp_path / "phi")


def test_file_without_config_fails_clearly(tmp_path, phi):
    save_file({k: v.contiguous() for k, v in phi.state_dict().items()}, tmp_path / "bare.safetensors")
    with pytest.raises(ValueError, match="no MetaPerturb config"):
        MetaPerturb.from_pretrained(tmp_path / "bare.safetensors")
