"""The training harness: meta-training φ (`meta.py`) and training a network with it or a baseline (`target.py`),
with their data (`data.py`, `glyphs.py`, `tasks.py`), metrics, plots and run records.

Needs the `[train]` extra; importing it without fails at once with the command that installs it.
"""

from importlib.util import find_spec

# the [train] extra's packages, by the name each is imported under
EXTRA = {"accelerate": "accelerate", "datasets": "datasets", "tqdm": "tqdm", "matplotlib": "matplotlib",
         "sklearn": "scikit-learn", "PIL": "pillow", "fontTools": "fonttools"}  # fmt: skip

_missing = [package for module, package in EXTRA.items() if find_spec(module) is None]
if _missing:
    raise ImportError(
        f"timm_metaperturb.training needs the [train] extra, which is missing {', '.join(_missing)}: "
        'pip install "timm-metaperturb[train]"'
    )
