"""Publish a φ folder (from meta-training or hub/import_official.py), or a trained network's folder (from
train/target.py or timm_metaperturb.save_pretrained), to a Hugging Face Hub repo, with its card.

    python hub/publish.py outputs/phi --repo-id your-name/metaperturb-phi [--private]
    python hub/publish.py outputs/digits-metaperturb --repo-id your-name/digits-resnet20
    python hub/publish.py outputs/phi --repo-id your-name/metaperturb-phi --dry-run outputs/upload

The folder is loaded (and so checked) before anything is sent. With --dry-run nothing is sent: the folder that would
be uploaded (weights, configs, card) is written instead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from timm_metaperturb import MetaPerturb, create_model, push_to_hub, save_pretrained
from timm_metaperturb.command_line import run_main
from timm_metaperturb.model_card import network_model_card


def is_network_folder(folder: Path) -> bool:
    """A trained network's folder: timm's config.json names an architecture (φ's config.json does not)."""
    config = folder / "config.json"
    return config.is_file() and "architecture" in json.loads(config.read_text())


def publish_network(folder: Path, repo_id: str, dry_run: Path | None, private: bool, revision: str | None) -> str:
    model = create_model(f"local-dir:{folder}", pretrained=True)
    run = json.loads((folder / "run.json").read_text()) if (folder / "run.json").is_file() else None
    card = network_model_card(model, f"hf-hub:{repo_id}", run)
    if dry_run:
        save_pretrained(model, dry_run, card=card)
        return str(dry_run)
    return push_to_hub(model, repo_id, card=card, private=private, revision=revision)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a φ folder, or a trained network's folder")
    parser.add_argument("--repo-id", required=True, help="owner/name of the Hub repo (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", help="branch to push to (default: main)")
    parser.add_argument("--dry-run", type=Path, metavar="DIR", help="write what would be uploaded to DIR instead")
    args = parser.parse_args(argv)

    if is_network_folder(args.folder):
        where = publish_network(args.folder, args.repo_id, args.dry_run, args.private, args.revision)
    else:
        phi = MetaPerturb.from_pretrained(args.folder)
        if args.dry_run:
            phi.save_pretrained(args.dry_run, repo_id=args.repo_id)
            where = str(args.dry_run)
        else:
            where = phi.push_to_hub(args.repo_id, private=args.private, branch=args.revision, commit_message="Upload φ")
    if args.dry_run:
        print(f"dry run: would upload to {args.repo_id}: " + ", ".join(sorted(p.name for p in args.dry_run.iterdir())))
    else:
        print(f"published {args.folder} to {where}")
    return where


if __name__ == "__main__":
    run_main(main)
