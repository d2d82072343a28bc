"""Strict loading's one report: which tensors a file lacks, has in excess or has in another shape."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def mismatch_report(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], shown: int = 8) -> str:
    """ "" when `given` has exactly the keys and shapes of `expected`; otherwise every missing, unexpected and
    mis-shaped key (the first `shown` of each), for an error that says what to fix."""
    groups = {
        "missing": sorted(set(expected) - set(given)),
        "unexpected": sorted(set(given) - set(expected)),
        "mis-shaped": [
            f"{k}: {tuple(given[k].shape)} (expected {tuple(v.shape)})"
            for k, v in expected.items()
            if k in given and given[k].shape != v.shape
        ],
    }
    return "; ".join(
        f"{label}: {', '.join(keys[:shown])}{f' and {len(keys) - shown} more' if len(keys) > shown else ''}"
        for label, keys in groups.items()
        if keys
    )
