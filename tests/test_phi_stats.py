"""benchmarks/phi_stats.py's spread measures: zero exactly for a φ that ignores its input, positive otherwise."""

import torch

from benchmarks.phi_stats import spread
from timm_metaperturb import MetaPerturb


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
