"""What training on real photos costs: the input pipeline alone, a full training step fed by it, and MetaPerturb's
share of a training step at the sizes users train at.

    python -m benchmarks.input_pipeline            # about 15 minutes on 2 CPU cores
    python -m benchmarks.input_pipeline --quick    # fewer repeats and batches
    python -m benchmarks.input_pipeline --device cuda --workers 2 4 8 16   # on a GPU: how many workers it needs

1. Loader: images per second of `TrainBatches` alone (decode, transform, collate) for the photo folder of
   `train/photo_folder.py` (JPEGs of a few dozen to a thousand pixels) with timm's transforms at 224 px, and the
   reference transform at 32 px streamed or held in memory, with 0, 1 and 2 loader workers.
2. Step: images per second of a whole training step (loader, forward, backward, Adam) for resnet50 at 224 px and
   resnet20 at 32 px, plain and with MetaPerturb, the loader with the most workers.
3. Overhead: a training step with MetaPerturb against the plain network on random inputs (resnet50, convnext_tiny,
   efficientnet_b0 at 224 px), medians of interleaved repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.overhead import DEFAULT_VARIANT, build, median_times, train_step_fn
from benchmarks.results import machine, write_section
from timm_metaperturb.training.cpu_memory import keep_freed_memory
from timm_metaperturb.training.data import Augmentation, EpochSampler
from timm_metaperturb.training.target import TargetConfig, TrainBatches, prepare_data
from train.photo_folder import write_photo_folder

OVERHEAD_MODELS = ("resnet50", "convnext_tiny", "efficientnet_b0")


def batches_for(folder: Path, model: str, size: int, augment: str, loader: str, workers: int, batch: int, steps: int,
                device: str = "cpu"):  # fmt: skip
    cfg = TargetConfig(dataset=str(folder), model=model, image_size=size, augment=augment, loader=loader,
                       workers=workers, batch_size=batch, steps=steps)  # fmt: skip
    train, _ = prepare_data(cfg)
    sampler = EpochSampler(len(train), batch, 0)
    return TrainBatches(train, Augmentation(cfg.crop_padding, cfg.hflip), sampler, cfg, 0, device)


PREFETCHED = 4  # batches each loader worker prepares ahead (`streaming.loader`)


def loader_rate(folder: Path, model: str, size: int, augment: str, loader: str, workers: int, batch: int,
                steps: int) -> float:  # fmt: skip
    """Images per second over `steps` batches, once the workers have started and their prefetched batches are
    drawn (so that the rate is the steady one)."""
    ahead = 1 + PREFETCHED * workers
    batches = batches_for(folder, model, size, augment, loader, workers, batch, ahead + steps)
    for _ in range(ahead):
        batches.next()
    start = time.perf_counter()
    for _ in range(steps):
        batches.next()
    return steps * batch / (time.perf_counter() - start)


def step_rates(folder: Path, model: str, size: int, augment: str, workers: int, batch: int, steps: int,
               device: str = "cpu") -> dict:  # fmt: skip
    """Images per second of whole training steps (the next batch from the loader, forward, backward, Adam), plain
    and with MetaPerturb taking turns on one loader: the median step of each after a warm-up."""
    nets = {v: build(model, size, v).to(device).train() for v in ("plain", DEFAULT_VARIANT)}
    optimizers = {v: torch.optim.Adam([p for p in n.parameters() if p.requires_grad], lr=1e-3) for v, n in nets.items()}
    ahead = 1 + PREFETCHED * workers
    batches = batches_for(folder, model, size, augment, "stream", workers, batch, ahead + 2 * (steps + 1), device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(ahead - 1):
        batches.next()
    times: dict[str, list[float]] = {v: [] for v in nets}
    for i in range(steps + 1):
        for variant, net in nets.items():
            start = time.perf_counter()
            x, y = batches.next()
            optimizers[variant].zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            optimizers[variant].step()
            sync()
            if i:  # the first of each is a warm-up
                times[variant].append(time.perf_counter() - start)
    return {v: batch / statistics.median(t) for v, t in times.items()}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu (2 threads for the network) or cuda")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader worker counts to measure")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(2)
        keep_freed_memory()
    batch_224, step_batch = (64, 64) if cuda else (8, 16)
    repeats, steps = (2, 8) if args.quick else (args.repeats, 24)
    workers = tuple(args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_photo_folder(Path(tmp) / "photos", train_per_class=80, test_per_class=2)
        loaders = [
            ("timm transforms, 224 px, streamed", ("resnet50", 224, "timm", "stream"), 32),
            ("reference transform, 32 px, streamed", ("resnet20", 32, "reference", "stream"), 128),
            ("reference transform, 32 px, in memory", ("resnet20", 32, "reference", "memory"), 128),
        ]
        loader_rows = []
        for label, (model, size, augment, loader), batch in loaders:
            counts = (0,) if loader == "memory" else workers
            rates = {w: loader_rate(folder, model, size, augment, loader, w, batch, steps) for w in counts}
            loader_rows.append((label, batch, rates))
            print(json.dumps({"loader": label, "images_per_s": rates}))
        step_rows = []
        for model, size, augment, batch in (("resnet50", 224, "timm", step_batch), ("resnet20", 32, "reference", 128)):
            rates = step_rates(folder, model, size, augment, max(workers), batch, repeats, args.device)
            step_rows.append((model, size, batch, rates))
            print(json.dumps({"step": model, "images_per_s": rates}))
    overhead_rows = []
    for model in OVERHEAD_MODELS:
        x, y = (
            torch.randn(batch_224, 3, 224, 224, device=args.device),
            torch.randint(0, 10, (batch_224,), device=args.device),
        )
        steps_fn = {v: train_step_fn(build(model, 224, v).to(args.device), x, y) for v in ("plain", DEFAULT_VARIANT)}
        times = median_times(steps_fn, repeats, warmup=1, device=args.device)
        overhead_rows.append((model, times))
        print(json.dumps({"overhead": model, "seconds": times}))

    command = "python -m " + " ".join(["benchmarks.input_pipeline", *(argv if argv is not None else sys.argv[1:])])
    threads = "" if cuda else "; 2 threads for the network"
    lines = [
        "## Input pipeline and step cost at the sizes users train at (`benchmarks/input_pipeline.py`)",
        "",
        f"Command: `{command}`; machine: {machine()}{threads}. Photos: `train/photo_folder.py` "
        "with 80 training photos per class, 800 JPEGs of a few dozen to about a thousand pixels a side, colour and "
        f"grayscale. Loader rates over {steps} batches after the prefetched ones; step rates are medians of "
        f"{repeats} steps, plain and MetaPerturb taking turns on one loader.",
        "",
        "**Loader alone** (images/s of training batches: decode, transform, collate, and the main process's part)",
        "",
        "| pipeline | batch | " + " | ".join(f"{w} workers" for w in workers) + " |",
        "| --- | --- | " + " | ".join("---" for _ in workers) + " |",
    ]
    for label, batch, rates in loader_rows:
        cells = " | ".join(f"{rates[w]:.0f}" if w in rates else "–" for w in workers)
        lines.append(f"| {label} | {batch} | {cells} |")
    lines += ["", f"**Whole training step fed by the loader** ({max(workers)} workers; images/s)", "",
              "| network | size | batch | plain | MetaPerturb | MetaPerturb / plain time |",
              "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for model, size, batch, rates in step_rows:
        plain, phi = rates["plain"], rates[DEFAULT_VARIANT]
        lines.append(f"| {model} | {size} | {batch} | {plain:.1f} | {phi:.1f} | {plain / phi:.2f}x |")
    lines += ["", f"**Training-step overhead at 224 px** (batch {batch_224}, random inputs; medians of {repeats} "
              "interleaved repeats)", "", "| network | plain step (s) | MetaPerturb step (s) | ratio |",
              "| --- | --- | --- | --- |"]  # fmt: skip
    for model, times in overhead_rows:
        plain, phi = times["plain"], times[DEFAULT_VARIANT]
        lines.append(f"| {model} | {plain:.3f} | {phi:.3f} | {phi / plain:.2f}x |")
    markdown = "\n".join(lines)
    write_section("input-pipeline" + ("-cuda" if cuda else "") + ("-quick" if args.quick else ""), markdown)
    print(markdown)
    return markdown


if __name__ == "__main__":
    main()
