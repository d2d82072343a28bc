"""timm-metaperturb: MetaPerturb, a meta-learned perturbation regularizer, for any timm or PyTorch CNN.

- `MetaPerturb` (phi.py): the 82-parameter perturbation function φ.
- `inject_metaperturb` / `remove_metaperturb` (injection.py): put φ after every block of any CNN; the blocks
  come from `discovery.py`, the hooks from `sites.py`.
- `create_model` (factory.py): timm's create_model with `metaperturb=True`.
- `models/`: the paper's networks, registered in timm (resnet20/32/44/56, wrn28_2, conv4, conv6, vgg9).
- `meta_training.py` (meta-training φ), `target_training.py` (training with it), `regularizers.py` (the
  paper's baselines), `data.py`, `tasks.py`, `metrics.py`, `plots.py`; `hub.py` and `model_card.py` (φ on the Hub);
  `cpu_memory.py` (faster CPU training steps by keeping freed memory).
"""

from . import models
from .cpu_memory import keep_freed_memory
from .discovery import NoBlocksError, Site, discover_sites, find_block_scopes
from .factory import create_model
from .injection import (
    MetaPerturbInjection,
    get_injection,
    inject_metaperturb,
    remove_metaperturb,
    set_eval_noise,
    set_perturb_strength,
)
from .loading import load_phi, packaged_phis
from .official_checkpoint import load_official_checkpoint
from .phi import MetaPerturb, SiteStatistics
from .recalibration import recalibrate_batchnorm
from .regularizers import DropBlock, InformationDropout, ManifoldMixup, add_regularizer

__version__ = "0.1.0"

__all__ = [
    "DropBlock",
    "InformationDropout",
    "ManifoldMixup",
    "MetaPerturb",
    "MetaPerturbInjection",
    "NoBlocksError",
    "Site",
    "SiteStatistics",
    "add_regularizer",
    "create_model",
    "discover_sites",
    "find_block_scopes",
    "get_injection",
    "inject_metaperturb",
    "keep_freed_memory",
    "load_official_checkpoint",
    "load_phi",
    "models",
    "packaged_phis",
    "recalibrate_batchnorm",
    "remove_metaperturb",
    "set_eval_noise",
    "set_perturb_strength",
]
