"""create_model: timm's create_model, plus MetaPerturb."""

import pytest
import timm
import torch

from timm_metaperturb import MetaPerturb, create_model, get_injection


def test_without_metaperturb_it_is_timms_model():
    torch.manual_seed(0)
    ours = create_model("resnet18", num_classes=5)
    torch.manual_seed(0)
    theirs = timm.create_model("resnet18", num_classes=5)
    assert type(ours) is type(theirs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())


def test_phi_sources(tmp_path, phi, official_phi_path):
    from_instance = create_model("resnet20", metaperturb=True, phi=phi)
    assert get_injection(from_instance).phi is phi

    phi.save_pretrained(tmp_path / "phi")
    from_folder = create_model("resnet20", metaperturb=True, phi=tmp_path / "phi")
    assert torch.equal(get_injection(from_folder).phi.scale_kernels, phi.scale_kernels)
    from_file = create_model("conv4", metaperturb=True, phi=str(tmp_path / "phi" / "model.safetensors"))
    assert torch.equal(get_injection(from_file).phi.scale_fc.weight, phi.scale_fc.weight)

    from_official = create_model("resnet20", metaperturb=True, phi=official_phi_path, placement="output")
    assert {s.position for s in get_injection(from_official).site_list} == {"output"}
    assert isinstance(get_injection(from_official).phi, MetaPerturb)


def test_default_phi_is_the_shipped_one():
    """The φ a model gets by default holds the tensors of the wheel's default_phi/model.safetensors, read here
    with safetensors alone (not through the loader under test), and is frozen."""
    from safetensors.torch import load_file

    from timm_metaperturb.loading import DEFAULT_PHI_DIR

    phi = get_injection(create_model("resnet20", metaperturb=True)).phi
    shipped = load_file(DEFAULT_PHI_DIR / "model.safetensors")
    assert set(shipped) == set(phi.state_dict()) and sum(v.numel() for v in shipped.values()) == 82
    assert all(torch.equal(v, shipped[k]) for k, v in phi.state_dict().items())
    assert not any(p.requires_grad for p in phi.parameters())


def test_bad_arguments(phi):
    with pytest.raises(RuntimeError, match="Unknown model"):
        create_model("resnet_nonexistent", metaperturb=True, phi=phi)
    with pytest.raises(ValueError, match="metaperturb=True"):
        create_model("resnet20", phi=phi)
    with pytest.raises(TypeError):
        create_model("resnet20", metaperturb=True, phi=phi, no_such_argument=1)


def test_sites_command_lists_the_sites(capsys):
    from timm_metaperturb.__main__ import main

    main(["resnet20", "--placement", "output"])
    out = capsys.readouterr().out
    assert "output of blocks.8" in out and out.strip().endswith("9 sites in resnet20")
