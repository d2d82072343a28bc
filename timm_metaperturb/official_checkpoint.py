"""Import φ from the MetaPerturb authors' checkpoint format (a `.pth` state dict of 6 tensors).

The file is read with `torch.load(weights_only=True)`, which unpickles tensors and plain containers only;
keys and shapes are checked before anything is copied.
"""

from __future__ import annotations

import os

import torch

from .phi import MetaPerturb

# authors' key -> MetaPerturb's key
OFFICIAL_KEYS = {
    "phi_1.w_identity": "noise1.weight_self",
    "phi_1.w_all": "noise1.weight_mean",
    "phi_2.w_identity": "noise2.weight_self",
    "phi_2.w_all": "noise2.weight_mean",
    "kernel": "scale_kernels",
    "fc.weight": "scale_fc.weight",
}


def load_official_checkpoint(
    path: str | os.PathLike, channel_norm: float = 64.0, spatial_norm: float = 32.0
) -> MetaPerturb:
    """Build φ from the authors' checkpoint; the normalisers are those its source network used (ResNet20 at
    32x32 for the published Tiny ImageNet φ), since the file does not record them."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"could not read {path} as a PyTorch state dict of tensors ({e}); the authors' checkpoint is a "
            "plain state dict with keys " + ", ".join(OFFICIAL_KEYS)
        ) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors (got {type(state).__name__})")
    kernels = state.get("kernel")
    h_dim, kernel_size = (kernels.shape[0], kernels.shape[-1]) if kernels is not None and kernels.dim() == 4 else (4, 3)
    phi = MetaPerturb(h_dim=h_dim, kernel_size=kernel_size, channel_norm=channel_norm, spatial_norm=spatial_norm)
    missing, unknown = sorted(set(OFFICIAL_KEYS) - set(state)), sorted(set(state) - set(OFFICIAL_KEYS))
    if missing or unknown:
        raise ValueError(
            f"{path} is not in the authors' φ format: missing {missing or 'nothing'}, unexpected {unknown or 'nothing'}"
        )
    renamed = {OFFICIAL_KEYS[k]: v for k, v in state.items()}
    phi.load_state_dict_strict(renamed, source=f"{path} (authors' format)")
    return phi
