"""What one meta-training step costs: seconds per meta-step (all T tasks: a training step of each task's
network plus its validation pass to φ's gradient, and φ's update) against 2 x T plain training steps of the
same network, measured in the same run, medians over repeats.

    python -m benchmarks.meta_cost            # the default φ's recipe: resnet20, Fashion-MNIST 0-4, 4 tasks
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import timm
import torch
import torch.nn.functional as F

from benchmarks.results import machine, write_section
from timm_metaperturb import MetaPerturb
from timm_metaperturb.training.cpu_memory import keep_freed_memory
from timm_metaperturb.training.data import ImageTensors
from timm_metaperturb.training.meta import MetaTrainConfig, TaskRunner
from timm_metaperturb.training.tasks import make_tasks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    malloc = ", malloc keeping freed memory" if keep_freed_memory() else ""  # as meta-training on a CPU has it

    # random images in the shape of the real data: cost does not depend on pixel values
    n = args.classes * 4 * args.batch_size
    data = ImageTensors(
        torch.randint(0, 256, (n, 3, args.image_size, args.image_size), dtype=torch.uint8),
        torch.arange(args.classes).repeat(n // args.classes),
        [str(c) for c in range(args.classes)],
    )
    cfg = MetaTrainConfig(model=args.model, image_size=args.image_size, batch_size=args.batch_size, groups=args.groups)
    tasks = make_tasks(data.labels, args.groups, min_images=args.batch_size)
    phi = MetaPerturb(spatial_norm=args.image_size)
    runners = [TaskRunner(t, data, cfg, phi, "cpu") for t in tasks]
    for p in phi.parameters():
        p.grad = torch.zeros_like(p)
    phi_optimizer = torch.optim.Adam(phi.parameters(), lr=1e-3)

    plain = timm.create_model(args.model, num_classes=len(tasks[0].classes))
    optimizer = torch.optim.Adam(plain.parameters(), lr=1e-3, weight_decay=5e-4)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    y = torch.randint(0, len(tasks[0].classes), (args.batch_size,))

    def meta_step(step: int) -> None:
        for p in phi.parameters():
            p.grad.zero_()
        for r in runners:
            r.step(step)
        phi_optimizer.step()

    def plain_steps() -> None:
        for _ in range(2 * len(tasks)):
            optimizer.zero_grad()
            F.cross_entropy(plain(x), y).backward()
            optimizer.step()

    times = {"meta": [], "plain": []}
    for i in range(args.repeats + 2):  # interleaved; the first two are warm-up
        for name, fn, fn_args in (("meta", meta_step, (i,)), ("plain", plain_steps, ())):
            start = time.perf_counter()
            fn(*fn_args)
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    meta, base = statistics.median(times["meta"]), statistics.median(times["plain"])
    command = "python -m benchmarks.meta_cost " + " ".join(sys.argv[1:] if argv is None else argv)
    table = f"""## Meta-training cost (`benchmarks/meta_cost.py`)

Command: `{command.strip()}`; machine: {machine()}; {args.threads} threads, one process{malloc}.
{args.model} at {args.image_size}x{args.image_size}, batch {args.batch_size}, T = {len(tasks)} tasks;
medians of {args.repeats} interleaved repeats.

| | seconds |
| --- | --- |
| one meta-step (all {len(tasks)} tasks) | {meta:.3f} |
| {2 * len(tasks)} plain training steps | {base:.3f} |
| ratio | {meta / base:.2f}x |
"""
    print(table)
    write_section("meta_cost", table)


if __name__ == "__main__":
    main()
