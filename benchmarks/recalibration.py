"""What the default evaluation's batch-norm re-estimation costs, as a multiple of one forward pass over the same
images: it reads them once per batch-norm layer, each pass stopped at that layer (`recalibrate_batchnorm`).

    python -m benchmarks.recalibration                   # resnet20, conv4, resnet18; 540 images at 32x32
    python -m benchmarks.recalibration --images 2500 --repeats 5

Both are timed with φ attached in its deterministic mode, interleaved, medians over the repeats.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import timm
import torch

from benchmarks.results import machine, write_section
from timm_metaperturb import inject_metaperturb, recalibrate_batchnorm, set_eval_noise

NETWORKS = ("resnet20", "conv4", "resnet18")


def measure(name: str, images: int, size: int, repeats: int) -> dict:
    model = inject_metaperturb(timm.create_model(name, num_classes=10), None, input_size=(3, size, size))
    set_eval_noise(model, "mean")
    batches = list(torch.randn(images, 3, size, size).split(512))
    forward, recalibration = [], []
    for _ in range(repeats + 1):  # the first round warms up
        model.eval()
        start = time.perf_counter()
        with torch.no_grad():
            for batch in batches:
                model(batch)
        forward.append(time.perf_counter() - start)
        start = time.perf_counter()
        norms = recalibrate_batchnorm(model, batches)
        recalibration.append(time.perf_counter() - start)
    f, r = statistics.median(forward[1:]), statistics.median(recalibration[1:])
    return {"network": name, "norms": norms, "forward": f, "recalibration": r}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=540)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = [measure(name, args.images, args.size, args.repeats) for name in NETWORKS]
    command = "python -m benchmarks.recalibration " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "## Cost of the batch-norm re-estimation (`benchmarks/recalibration.py`)",
        f"Command: `{command.strip()}`; machine: {machine()}; {args.images} images at {args.size}x{args.size}, "
        f"batches of 512, medians of {args.repeats}.",
        "| network | batch-norm layers | one forward pass (s) | re-estimation (s) | ratio |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        times = f"{r['forward']:.3f} | {r['recalibration']:.3f} | {r['recalibration'] / r['forward']:.1f}x"
        lines.append(f"| {r['network']} | {r['norms']} | {times} |")
    text = "\n\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:])
    write_section("recalibration", text)
    print(text)
    return text


if __name__ == "__main__":
    main()
