"""timm-metaperturb: MetaPerturb, a meta-learned perturbation regularizer, for any timm or PyTorch CNN.

Where things are:
- `phi/`: φ itself, the 82-parameter perturbation function (`MetaPerturb`), and the code that computes it.
- `injection.py`: put φ after every block of any CNN (`inject_metaperturb`); the blocks come from
  `discovery.py`, the hooks from `sites.py`. `regularizers/`: the paper's baselines, attached the same way.
- `factory.py`: timm's `create_model` with `metaperturb=True`; `models/`: the paper's networks, registered in timm.
- `schedule.py`: the strength's schedule, advanced by the optimizer's steps; `pretrained.py`: a trained network
  saved and reloaded in timm's format, with φ beside it (`save_pretrained`, `push_to_hub`, `create_model`).
- `loading.py`, `hub.py`, `model_card.py`, `official_checkpoint.py`: φ from files, the Hub and the authors' format.
- `training/`: meta-training φ and training with it (needs the `[train]` extra).

Importing this package needs only the core install; `timm_metaperturb.training` needs `[train]`.
"""

from . import models
from .discovery import NoBlocksError, discover_sites
from .factory import create_model
from .injection import (
    finalize_for_inference,
    get_injection,
    inject_metaperturb,
    remove_metaperturb,
    set_eval_noise,
    set_perturb_strength,
)
from .loading import load_phi, packaged_phis
from .official_checkpoint import load_official_checkpoint
from .phi import MetaPerturb
from .pretrained import push_to_hub, save_pretrained
from .recalibration import recalibrate_batchnorm
from .regularizers import add_regularizer, get_regularizer, remove_regularizer

__version__ = "0.1.0"

__all__ = [
    "MetaPerturb",
    "NoBlocksError",
    "add_regularizer",
    "create_model",
    "discover_sites",
    "finalize_for_inference",
    "get_injection",
    "get_regularizer",
    "inject_metaperturb",
    "load_official_checkpoint",
    "load_phi",
    "models",
    "packaged_phis",
    "push_to_hub",
    "recalibrate_batchnorm",
    "remove_metaperturb",
    "remove_regularizer",
    "save_pretrained",
    "set_eval_noise",
    "set_perturb_strength",
]
