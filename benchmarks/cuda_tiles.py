"""Whether φ's Triton kernels are limited by their launch configuration: resnet20's training step at 32x32 with
the whole step captured in a CUDA graph, for each tile (pixels x channels per program step) and warps per program
(`timm_metaperturb.phi.cuda.Tile`), as a ratio to the plain network's graphed step, medians over interleaved
repeats. Needs a GPU.

    python -m benchmarks.cuda_tiles --repeats 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

from benchmarks.overhead import DEFAULT_VARIANT, GraphedTrainStep, build, median_times
from benchmarks.results import machine, write_section
from timm_metaperturb.phi import cuda as phi_cuda

TILES = [  # the shipped tile first, then halved and doubled in pixels, channels and warps
    phi_cuda.Tile(),
    phi_cuda.Tile(64, 16, 4),
    phi_cuda.Tile(256, 8, 4),
    phi_cuda.Tile(256, 16, 8),
    phi_cuda.Tile(128, 16, 8),
    phi_cuda.Tile(64, 16, 2),
    phi_cuda.Tile(128, 32, 8),
    phi_cuda.Tile(512, 16, 8),
    phi_cuda.Tile(256, 16, 4),
]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("the tiles are the Triton kernels' launch configuration: this benchmark needs a CUDA GPU")
    x = torch.randn(args.batch_size, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (args.batch_size,), device="cuda")
    plain = GraphedTrainStep(build("resnet20", 32, "plain").cuda(), x, y)
    shipped, rows = phi_cuda.TILE, []
    try:
        for tile in TILES:
            phi_cuda.TILE = tile  # the graph captures the launches made with it
            step = GraphedTrainStep(build("resnet20", 32, DEFAULT_VARIANT).cuda(), x, y)
            times = median_times({"plain": plain, "φ": step}, args.repeats, device="cuda")
            rows.append((tile, times["φ"] / times["plain"]))
            print(json.dumps({**dataclasses.asdict(tile), "ratio": rows[-1][1], **times}), flush=True)
    finally:
        phi_cuda.TILE = shipped
    command = "python -m benchmarks.cuda_tiles " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = ["| tile (pixels x channels) | warps | φ step in a CUDA graph (x plain graphed) |", "| --- | --- | --- |"]
    for tile, ratio in rows:
        name = f"{tile.pixels} x {tile.channels}" + (" (shipped)" if tile == shipped else "")
        lines.append(f"| {name} | {tile.warps} | {ratio:.2f}x |")
    text = (
        "## φ's Triton kernels against their launch configuration (`benchmarks/cuda_tiles.py`)\n\n"
        f"Command: `{command.strip()}`; machine: {machine()}; resnet20 at 32x32, batch {args.batch_size}, the whole "
        f"training step (forward, backward, Adam) captured in a CUDA graph; medians of {args.repeats} interleaved "
        "repeats against the plain network's graphed step.\n\n" + "\n".join(lines)
    )
    print(text)
    write_section("cuda-tiles", text)
    return text


if __name__ == "__main__":
    main()
