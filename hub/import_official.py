"""Import the MetaPerturb authors' φ checkpoint (`.pth`) into a φ folder (safetensors, config, model card).

python hub/import_official.py ../shared/reference/official_phi_tin_resnet20.pth outputs/phi-official-tin
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from timm_metaperturb import load_official_checkpoint
from timm_metaperturb.command_line import run_main

# The paper's Table 1 (ResNet-20, source Tiny ImageNet, mean of 5 runs): reported, not measured here.
PAPER_RESULTS = [
    {"target": target, "network": "resnet20", "base": base, "MetaPerturb": ours, "source": "reported (paper, Table 1)"}
    for target, base, ours in (
        ("STL10", 66.78, 69.98),
        ("s-CIFAR100", 31.79, 34.57),
        ("Stanford Dogs", 34.65, 38.41),
        ("Stanford Cars", 44.34, 62.46),
        ("Aircraft", 59.23, 65.87),
        ("CUB", 30.63, 42.01),
    )
]


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="the authors' .pth state dict")
    parser.add_argument("output", type=Path, help="folder to write the φ to")
    parser.add_argument("--repo-id", help="the Hub repo the card's usage snippet loads from (default: the folder)")
    args = parser.parse_args(argv)

    phi = load_official_checkpoint(args.checkpoint)
    sha256 = hashlib.sha256(args.checkpoint.read_bytes()).hexdigest()
    phi.provenance = {
        "title": "MetaPerturb φ of the paper's authors (Tiny ImageNet, ResNet-20)",
        "origin": f"imported from the authors' checkpoint {args.checkpoint.name} (sha256 {sha256}), published "
        "with github.com/JWoong148/MetaPerturb, by hub/import_official.py",
        "source_dataset": "Tiny ImageNet (200 classes at 32x32)",
        "source_classes": "5 groups of 40 classes",
        "tasks": 10,
        "source_model": "resnet20",
        "steps": 750,
        "results": PAPER_RESULTS,
        "notes": "The authors' φ, converted locally for comparison: it is not part of the timm-metaperturb package.",
    }
    phi.save_pretrained(args.output, repo_id=args.repo_id)
    print(f"wrote {args.output}: " + ", ".join(sorted(p.name for p in args.output.iterdir())))
    return args.output


if __name__ == "__main__":
    run_main(main)
