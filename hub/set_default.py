"""Make a φ folder (from train/meta.py) the default φ that timm-metaperturb ships inside its wheel.

    python hub/set_default.py outputs/meta-fmnist-0-4/phi
    python hub/set_default.py outputs/meta-letters/phi --keep-current-as fashion-mnist-0-4

Writes timm_metaperturb/default_phi/ (model.safetensors, config.json, and a card whose usage snippet relies
on the default), after checking that the folder loads strictly. With --keep-current-as, the φ that was the
default first moves to timm_metaperturb/phis/NAME, where `phi="NAME"` finds it.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from timm_metaperturb import MetaPerturb
from timm_metaperturb.command_line import run_main
from timm_metaperturb.loading import DEFAULT_PHI_DIR, PACKAGED_PHIS_DIR, packaged_phis


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a φ folder written by save_pretrained")
    parser.add_argument("--keep-current-as", metavar="NAME", help="ship the current default on under this name")
    args = parser.parse_args(argv)
    phi = MetaPerturb.from_pretrained(args.folder)
    if args.keep_current_as:
        if args.keep_current_as in packaged_phis():
            raise SystemExit(f"a φ named {args.keep_current_as!r} already ships: pick another name")
        kept = MetaPerturb.from_pretrained(DEFAULT_PHI_DIR)
        kept.save_pretrained(
            PACKAGED_PHIS_DIR / args.keep_current_as, model_card_kwargs={"phi_source": args.keep_current_as}
        )
    shutil.rmtree(DEFAULT_PHI_DIR, ignore_errors=True)
    phi.save_pretrained(DEFAULT_PHI_DIR, model_card_kwargs={"phi_source": None})
    print(f"{args.folder} is now the default φ: " + ", ".join(sorted(p.name for p in DEFAULT_PHI_DIR.iterdir())))
    return DEFAULT_PHI_DIR


if __name__ == "__main__":
    run_main(main)
