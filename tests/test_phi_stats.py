"""The φ diagnostics: benchmarks/phi_stats.py's spread measures (zero exactly for a φ that ignores its input,
positive otherwise) and benchmarks/phi_parts.py's mixtures of two φs."""

import pytest
import torch

from benchmarks.phi_parts import main, mixture
from benchmarks.phi_stats import spread
from timm_metaperturb import MetaPerturb, load_phi


def test_spread_is_zero_for_an_input_independent_phi_only():
    torch.manual_seed(0)
    inputs = [torch.randn(8, 16, 8, 8), torch.randn(8, 32, 4, 4)]
    blind = MetaPerturb()
    with torch.no_grad():
        for p in blind.parameters():
            p.zero_()
    r = spread(blind, inputs)
    assert r["a_std"] == 0 and r["z_cv"] < 1e-6 and r["s_std"] == 0  # (float32 std of a constant)
    assert r["s_min"] == r["s_max"] == 0.5
    seeing = MetaPerturb()
    with torch.no_grad():
        for p in seeing.parameters():
            p.normal_(std=0.3)
    r = spread(seeing, inputs)
    assert r["a_std"] > 0.01 and r["z_cv"] > 0.01 and r["s_std"] > 0.001 and r["s_min"] < r["s_max"]


def test_phi_parts_takes_the_noise_of_one_and_the_scale_of_the_other(tmp_path):
    torch.manual_seed(0)
    noisy, scaling = MetaPerturb(), MetaPerturb()
    with torch.no_grad():
        for p in (*noisy.parameters(), *scaling.parameters()):
            p.normal_(std=0.3)
    h = torch.randn(8, 16, 8, 8)
    main(["--noise", str(_saved(noisy, tmp_path / "n")), "--scale", str(_saved(scaling, tmp_path / "s")),
          "--output", str(tmp_path / "mixed")])  # fmt: skip
    mixed = load_phi(tmp_path / "mixed")
    torch.testing.assert_close(mixed.noise_logits(h), noisy.noise_logits(h))
    stats = mixed.channel_statistics(h, None)
    torch.testing.assert_close(mixed.scale(*stats, 8), scaling.scale(*stats, 8))
    assert not torch.allclose(mixed.scale(*stats, 8), noisy.scale(*stats, 8))
    assert f"--scale {tmp_path / 's'}" in (tmp_path / "mixed" / "README.md").read_text(), "the card says how"
    with pytest.raises(ValueError, match="same form"):
        mixture(noisy, MetaPerturb(h_dim=2))


def _saved(phi: MetaPerturb, folder):
    phi.save_pretrained(folder)
    return folder
