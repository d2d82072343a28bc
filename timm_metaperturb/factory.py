"""`create_model`: timm's create_model, plus MetaPerturb after every block when asked."""

from __future__ import annotations

import timm
from torch import nn

from .discovery import BlocksSpec
from .injection import inject_metaperturb
from .loading import PhiSource


def create_model(
    model_name: str,
    pretrained: bool = False,
    *,
    metaperturb: bool = False,
    phi: PhiSource = None,
    blocks: BlocksSpec = None,
    placement: str = "pre_activation",
    **kwargs,
) -> nn.Module:
    """Create a timm model (`timm.create_model(model_name, pretrained, **kwargs)`), with MetaPerturb injected
    after every block when `metaperturb=True`. With `metaperturb=False` the result is exactly timm's model.

    `phi` is a MetaPerturb, a local folder or file, or a Hub repo id (default: the φ this package ships);
    `blocks` and `placement` are those of `inject_metaperturb`.
    """
    if not metaperturb and (phi is not None or blocks is not None):
        raise ValueError("phi= and blocks= configure MetaPerturb: pass metaperturb=True as well")
    model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    if not metaperturb:
        return model
    return inject_metaperturb(model, phi, blocks=blocks, placement=placement)
