"""What MetaPerturb costs on top of the plain network, in one run: training step (forward, backward, Adam) and
eval forward time as ratios to the plain network, and the peak memory of a training step.

    python benchmarks/overhead.py                 # the full table (about 10 minutes on 2 CPU cores)
    python benchmarks/overhead.py --quick         # fewer repeats

Rows: the project's φ (`timm_metaperturb.MetaPerturb`) and a straightforward reference implementation of the
formulas written here (depthwise convolutions with the kernels repeated per channel, a grouped convolution with
4C outputs for the scale statistics, separate elementwise operations). Times are medians over interleaved
repeats; memory is the peak resident-set growth of one training step, each measured in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import timm
import torch
import torch.nn.functional as F

from benchmarks.results import machine, write_section
from timm_metaperturb import MetaPerturb, SiteStatistics, inject_metaperturb, set_eval_noise
from timm_metaperturb.discovery import Site, discover_sites
from timm_metaperturb.sites import SiteModule, attach

CONFIGS = [("resnet20", 32), ("resnet20", 84), ("resnet18", 64)]


class ReferencePerturbation(SiteModule):
    """The formulas, written out directly, applied at the same sites with the same φ weights."""

    def __init__(self, sites: list[Site], phi: MetaPerturb) -> None:
        super().__init__(sites)
        self.phi = phi
        self.stats = torch.nn.ModuleDict({s.key: SiteStatistics(s.channels, phi.h_dim) for s in sites})

    def perturb(self, site: Site, h: torch.Tensor) -> torch.Tensor:
        phi, stats, c = self.phi, self.stats[site.key], h.shape[1]

        def depthwise(x, kernel):
            return F.conv2d(x, kernel.repeat(c, 1, 1, 1), padding=1, groups=c)

        def equivariant(x, layer):
            return depthwise(x, layer.weight_self) + F.conv2d(x.mean(1, keepdim=True), layer.weight_mean, padding=1)

        a = equivariant(F.relu(equivariant(h, phi.noise1)), phi.noise2)
        z = F.softplus(a + torch.randn_like(a))
        if stats.training:
            f = F.relu(depthwise(h, phi.scale_kernels)).mean((2, 3)).view(h.shape[0], c, -1)
            mean, var = f.mean(0), f.var(0)
            with torch.no_grad():
                stats.running_mean.lerp_(mean, phi.momentum)
                stats.running_var.lerp_(var, phi.momentum)
        else:
            mean, var = stats.running_mean, stats.running_var
        s = phi.scale(mean, var, h.shape[-2]).view(1, c, 1, 1)
        return torch.clamp(s * z * h, max=phi.clip)


def build(name: str, size: int, variant: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    if variant == "project":
        inject_metaperturb(model, MetaPerturb(), input_size=(3, size, size))
    elif variant == "reference":
        sites = discover_sites(model, input_size=(3, size, size))
        attach(model, ReferencePerturbation(sites, MetaPerturb().requires_grad_(False)), "reference")
    return model


def train_step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=5e-4)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def eval_fn(model: torch.nn.Module, x: torch.Tensor, passes: int = 1):
    model.eval()

    @torch.no_grad()
    def forward() -> None:
        for _ in range(passes):
            model(x)

    return forward


def median_times(fns: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Interleave the candidates so that machine noise hits them alike; median seconds per call."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_memory_mb(name: str, size: int, variant: str, batch: int) -> float:
    """Peak RSS growth (MB) over two training steps, from the state after building the model and the batch,
    in a fresh process."""
    code = (
        "import resource, sys, torch; sys.path.insert(0, '.')\n"
        "from benchmarks.overhead import build, train_step_fn\n"
        f"torch.set_num_threads(2); model = build({name!r}, {size}, {variant!r})\n"
        f"x, y = torch.randn({batch}, 3, {size}, {size}), torch.randint(0, 10, ({batch},))\n"
        "step = train_step_fn(model, x, y); before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "step(); step(); print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--mc-passes", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="3 repeats, no memory measurement")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    repeats = 3 if args.quick else args.repeats
    rows = []
    for name, size in CONFIGS:
        x = torch.randn(args.batch_size, 3, size, size)
        y = torch.randint(0, 10, (args.batch_size,))
        models = {v: build(name, size, v) for v in ("plain", "project", "reference")}
        train = median_times({v: train_step_fn(m, x, y) for v, m in models.items()}, repeats)
        set_eval_noise(models["project"], "mean")
        evals = {"plain": eval_fn(models["plain"], x), "single pass": eval_fn(models["project"], x)}
        evals[f"MC-{args.mc_passes}"] = eval_fn(models["reference"], x, args.mc_passes)
        evaluation = median_times(evals, repeats)
        memory = {} if args.quick else {v: peak_memory_mb(name, size, v, args.batch_size) for v in models}
        rows.append((name, size, train, evaluation, memory))
        print(json.dumps({"model": name, "size": size, "train": train, "eval": evaluation, "memory": memory}))

    mc = f"MC-{args.mc_passes}"
    lines = [
        "| network | input | plain step (s) | project φ | reference φ | plain eval (s) | single pass | "
        f"{mc} | peak memory, project / reference (x plain) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, size, train, evaluation, memory in rows:
        mem = "–"
        if memory:
            mem = f"{memory['project'] / memory['plain']:.2f} / {memory['reference'] / memory['plain']:.2f}"
        ratio = {k: v / evaluation["plain"] for k, v in evaluation.items()}
        lines.append(
            f"| {name} | {size}x{size} | {train['plain']:.3f} | {train['project'] / train['plain']:.2f}x | "
            f"{train['reference'] / train['plain']:.2f}x | {evaluation['plain']:.3f} | "
            f"{ratio['single pass']:.2f}x | {ratio[mc]:.2f}x | {mem} |"
        )
    command = "python benchmarks/overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (
        f"## MetaPerturb overhead (`benchmarks/overhead.py`)\n\nCommand: `{command.strip()}`; machine: {machine()}; "
        f"2 threads; batch {args.batch_size}; medians of {repeats} interleaved repeats; ratios to the plain network "
        "measured in the same run. Training step = forward, backward, Adam. Eval: one deterministic pass "
        f"(noise replaced by its expectation) and {mc} ({args.mc_passes} stochastic passes, the reference's way).\n\n"
        + "\n".join(lines)
    )
    print(text)
    write_section("overhead", text)
    return text


if __name__ == "__main__":
    main()
