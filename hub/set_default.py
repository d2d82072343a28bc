"""Make a φ folder (from train/meta.py) the default φ that timm-metaperturb ships inside its wheel.

    python hub/set_default.py outputs/meta-fmnist-0-4/phi

Writes timm_metaperturb/default_phi/ (model.safetensors, config.json, and a card whose usage snippet relies
on the default), after checking that the folder loads strictly.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from timm_metaperturb import MetaPerturb
from timm_metaperturb.loading import DEFAULT_PHI_DIR


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a φ folder written by save_pretrained")
    args = parser.parse_args(argv)
    phi = MetaPerturb.from_pretrained(args.folder)
    shutil.rmtree(DEFAULT_PHI_DIR, ignore_errors=True)
    phi.save_pretrained(DEFAULT_PHI_DIR, model_card_kwargs={"phi_source": None})
    print(f"{args.folder} is now the default φ: " + ", ".join(sorted(p.name for p in DEFAULT_PHI_DIR.iterdir())))
    return DEFAULT_PHI_DIR


if __name__ == "__main__":
    main()
