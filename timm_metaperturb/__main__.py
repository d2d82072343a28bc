"""`python -m timm_metaperturb MODEL`: show where MetaPerturb goes in a timm model, before training with it."""

from __future__ import annotations

import argparse

import timm

from .command_line import run_main
from .discovery import PLACEMENTS, discover_sites


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="a timm model name, e.g. resnet20 or resnet50")
    parser.add_argument("--placement", choices=PLACEMENTS, default="pre_activation")
    parser.add_argument("--blocks", help="a regex of block module names, overriding the discovery rules")
    parser.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), help="probe input size")
    args = parser.parse_args(argv)
    model = timm.create_model(args.model)
    sites = discover_sites(model, blocks=args.blocks, placement=args.placement, input_size=args.input_size)
    rows = [("site", "perturbs", "channels", "rule")]
    for s in sites:
        where = f"input of {s.target}" + (f" (call {s.call})" if s.call > 1 else "")
        channels = f"{s.channels}" + (" (last dim)" if s.channels_dim != 1 else "")
        rows.append((s.name, where if s.position == "input" else f"output of {s.target}", channels, s.rule))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print(f"{len(sites)} sites in {args.model}")


if __name__ == "__main__":
    run_main(main)
