"""Publish a φ folder (from meta-training or hub/import_official.py) to a Hugging Face Hub repo, with its card.

    python hub/publish.py outputs/phi --repo-id your-name/metaperturb-phi [--private]
    python hub/publish.py outputs/phi --repo-id your-name/metaperturb-phi --dry-run outputs/upload

With --dry-run nothing is sent: the folder that would be uploaded (weights, config, card) is written instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from timm_metaperturb import MetaPerturb
from timm_metaperturb.command_line import run_main


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a φ folder written by save_pretrained")
    parser.add_argument("--repo-id", required=True, help="owner/name of the Hub repo (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", help="branch to push to (default: main)")
    parser.add_argument("--dry-run", type=Path, metavar="DIR", help="write what would be uploaded to DIR instead")
    args = parser.parse_args(argv)

    phi = MetaPerturb.from_pretrained(args.folder)  # validates the folder before anything is sent
    if args.dry_run:
        phi.save_pretrained(args.dry_run, repo_id=args.repo_id)
        print(f"dry run: would upload to {args.repo_id}: " + ", ".join(sorted(p.name for p in args.dry_run.iterdir())))
        return str(args.dry_run)
    url = phi.push_to_hub(args.repo_id, private=args.private, branch=args.revision, commit_message="Upload φ")
    print(f"published {args.folder} to {url}")
    return url


if __name__ == "__main__":
    run_main(main)
