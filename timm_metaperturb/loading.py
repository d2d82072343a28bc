"""Turning whatever a user passes as `phi=` into a MetaPerturb: an instance, a folder, a file or a Hub repo id."""

from __future__ import annotations

import os
from pathlib import Path

from .phi import MetaPerturb

PhiSource = MetaPerturb | str | os.PathLike | None

DEFAULT_PHI_DIR = Path(__file__).parent / "default_phi"
PACKAGED_PHIS_DIR = Path(__file__).parent / "phis"  # other φs that ship in the wheel, one folder per name


def packaged_phis() -> list[str]:
    """The names `load_phi` (and `phi=` everywhere) accepts for the φs shipped beside the default."""
    return sorted(p.parent.name for p in PACKAGED_PHIS_DIR.glob("*/config.json"))


def load_phi(source: PhiSource = None) -> MetaPerturb:
    """A MetaPerturb from `source`:

    - None: the φ this package ships (`timm_metaperturb/default_phi/`);
    - the name of another φ it ships (`packaged_phis()`, e.g. "fashion-mnist-0-4");
    - a MetaPerturb: itself (shared, not copied);
    - a folder saved by `save_pretrained`, or a single `.safetensors` file it wrote;
    - a `.pth` file: the authors' checkpoint format, imported without a general unpickle;
    - anything else: a Hugging Face Hub repo id.
    """
    if isinstance(source, MetaPerturb):
        return source
    if source is None:
        if not (DEFAULT_PHI_DIR / "config.json").is_file():
            raise FileNotFoundError(
                "this build of timm-metaperturb ships no default φ yet: pass phi= a MetaPerturb, a folder saved "
                "with MetaPerturb.save_pretrained, a .safetensors file, a Hub repo id, or the authors' checkpoint "
                "(a .pth file, imported with timm_metaperturb.load_official_checkpoint)"
            )
        return MetaPerturb.from_pretrained(DEFAULT_PHI_DIR)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"phi= takes a MetaPerturb, a path or a Hub repo id, got {type(source).__name__}")
    path = Path(source)
    if not path.exists() and str(source) in packaged_phis():
        return MetaPerturb.from_pretrained(PACKAGED_PHIS_DIR / str(source))
    if path.suffix == ".pth":
        from .official_checkpoint import load_official_checkpoint

        return load_official_checkpoint(path)
    return MetaPerturb.from_pretrained(source)
