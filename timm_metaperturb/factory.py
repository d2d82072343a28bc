"""`create_model`: timm's create_model, plus MetaPerturb after every block when asked, or as a saved network has it."""

from __future__ import annotations

import timm
from torch import nn

from .discovery import BlocksSpec
from .injection import ANNEAL, inject_metaperturb
from .loading import PhiSource
from .pretrained import attach_saved_metaperturb, check_architecture, metaperturb_files


def create_model(
    model_name: str,
    pretrained: bool = False,
    *,
    metaperturb: bool | None = None,
    phi: PhiSource = None,
    blocks: BlocksSpec = None,
    placement: str = "pre_activation",
    total_steps: int | None = None,
    anneal: float = ANNEAL,
    **kwargs,
) -> nn.Module:
    """Create a timm model (`timm.create_model(model_name, pretrained, **kwargs)`), with MetaPerturb injected
    after every block when `metaperturb=True`. With `metaperturb=False` the result is exactly timm's model.

    A network saved by `timm_metaperturb.save_pretrained` (`"local-dir:FOLDER"`, `"hf-hub:REPO"`) with
    `pretrained=True` comes back with its saved φ attached, its sites' statistics, step count and evaluation mode
    restored (`metaperturb=None`, the default, follows what was saved; False gives the plain network).

    Otherwise `phi` is a MetaPerturb, a local folder or file, or a Hub repo id (default: the φ this package ships);
    `blocks`, `placement`, `total_steps` (the length of training, for the strength's schedule) and `anneal` are
    those of `inject_metaperturb`.
    """
    configured = phi is not None or blocks is not None or total_steps is not None
    if configured and not metaperturb:
        raise ValueError("phi=, blocks= and total_steps= configure MetaPerturb: pass metaperturb=True as well")
    check_architecture(model_name)
    saved = metaperturb_files(model_name) if pretrained and metaperturb is not False and not configured else None
    model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    if saved is not None:
        return attach_saved_metaperturb(model, *saved)
    if not metaperturb:
        return model
    return inject_metaperturb(model, phi, blocks=blocks, placement=placement, total_steps=total_steps, anneal=anneal)
