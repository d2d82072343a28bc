"""What MetaPerturb costs on top of the plain network, in one run: training step (forward, backward, Adam) and
eval forward time as ratios to the plain network, and the memory a training step keeps for its backward.

    python -m benchmarks.overhead                 # the full table (about 10 minutes on 2 CPU cores)
    python -m benchmarks.overhead --quick         # fewer repeats
    python -m benchmarks.overhead --profile       # where a φ step's time goes (benchmarks/profiles/)
    python -m benchmarks.overhead --compile       # also the training step and the single-pass eval under
                                                  # torch.compile (with --profile: the eval's operators)

Rows: the project's φ (`timm_metaperturb.MetaPerturb`, frozen as in target training) on its fused kernels (the
default) and on torch operators with eps kept for the backward or drawn again there from its seed
(`redraw_noise`), and a straightforward reference implementation of the formulas written here (depthwise
convolutions with the kernels repeated per channel, a grouped convolution with 4C outputs for the scale
statistics, separate elementwise operations). Times are medians over interleaved repeats; memory is what autograd
saves for the backward (distinct storages), the part of a training step's peak that φ's implementation decides.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from benchmarks.results import machine, write_section
from timm_metaperturb import MetaPerturb, inject_metaperturb, set_eval_noise
from timm_metaperturb.discovery import Site, discover_sites
from timm_metaperturb.phi import SiteStatistics
from timm_metaperturb.phi.reference import reference_perturb
from timm_metaperturb.sites import SiteModule, attach
from timm_metaperturb.training.cpu_memory import keep_freed_memory

CONFIGS = [("resnet20", 32), ("resnet20", 84), ("resnet18", 64)]
PROFILES = Path(__file__).with_name("profiles")  # --profile's tables, one file per device kind
# the project's φ: on its fused kernels (C++ on a CPU, Triton on CUDA; the default, eps drawn again in the
# backward), or on torch operators with eps kept for the backward or drawn again there from its seed
VARIANTS = {
    "fused": {"fused_kernels": True, "redraw_noise": None},
    "kept": {"fused_kernels": False, "redraw_noise": False},
    "redrawn": {"fused_kernels": False, "redraw_noise": True},
}
EVAL_VARIANTS = ["fused", "kept"]  # the variants whose single pass differs (eps kept or redrawn: the same at eval)
DEFAULT_VARIANT = "fused"
NCHW = "plain NCHW"  # with --channels-last: the plain network in the default layout, for what NHWC gains


class ReferencePerturbation(SiteModule):
    """The formulas, written out directly (`phi/reference.py`), applied at the same sites with the same φ."""

    def __init__(self, sites: list[Site], phi: MetaPerturb) -> None:
        super().__init__(sites)
        self.phi = phi
        self.stats = torch.nn.ModuleDict({s.key: SiteStatistics(s.channels, phi.h_dim) for s in sites})

    def perturb(self, site: Site, h: torch.Tensor) -> torch.Tensor:
        stats = self.stats[site.key]
        running = None if stats.training else (stats.running_mean, stats.running_var)
        out, (mean, var) = reference_perturb(self.phi, h, torch.randn_like(h), running)
        if stats.training:
            with torch.no_grad():
                stats.running_mean.lerp_(mean, self.phi.momentum)
                stats.running_var.lerp_(var, self.phi.momentum)
        return out


def build(name: str, size: int, variant: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    if variant in VARIANTS:
        phi = MetaPerturb()
        for attribute, value in VARIANTS[variant].items():
            setattr(phi, attribute, value)
        inject_metaperturb(model, phi, input_size=(3, size, size))
    elif variant == "reference":
        sites = discover_sites(model, input_size=(3, size, size))
        attach(model, ReferencePerturbation(sites, MetaPerturb().requires_grad_(False)), "reference")
    return model


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    """`torch.compile(model)` as one graph. Dynamo does not guard on module hooks by default, so a φ model (the
    plain network plus hooks) would reuse a plain model's graph, φ left out: guarded here."""
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    return torch.compile(model, fullgraph=True)


def train_step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, compile: bool = False):
    """One training step (with `compile`, of the compiled model); the model is put in training mode by every call,
    as other candidates share it."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=5e-4)
    forward = compiled(model) if compile else model

    def step() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(forward(x), y).backward()
        optimizer.step()

    return step


class GraphedTrainStep:
    """One training step captured whole in a CUDA graph (forward, backward, Adam with capturable state) and
    replayed: no host work per kernel is left, only the GPU's. φ draws its seed on the GPU, so each replay
    samples new noise. Holds the model and the optimizer: the graph reads and writes their memory."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        self.model, self.x, self.y = model.train(), x, y
        self.optimizer = torch.optim.Adam(
            [p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=5e-4, capturable=True
        )
        self.step()  # warm-up: kernels compiled, gradients and optimizer state allocated
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # and on a side stream, as capture asks
            for _ in range(2):
                self.step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=False)
        F.cross_entropy(self.model(self.x), self.y).backward()
        self.optimizer.step()

    def __call__(self) -> None:
        self.graph.replay()


def eval_fn(model: torch.nn.Module, x: torch.Tensor, passes: int = 1, noise: str | None = None):
    """Eval forward(s); `noise` sets MetaPerturb's evaluation ("mean": deterministic, "sample": Monte-Carlo). Like
    the training step, every call sets the mode it needs."""

    @torch.no_grad()
    def forward() -> None:
        model.eval()
        if noise is not None:
            set_eval_noise(model, noise)
        for _ in range(passes):
            model(x)

    return forward


def compiled_eval_fn(model: torch.nn.Module, x: torch.Tensor, noise: str | None = None):
    """One eval forward of `torch.compile(model)` as a single graph, checked against the eager forward first, so
    that a compiled graph which left φ out cannot be timed."""
    model.eval()
    if noise is not None:
        set_eval_noise(model, noise)
    forward = compiled(model)
    with torch.no_grad():
        torch.testing.assert_close(forward(x), model(x), rtol=1e-4, atol=1e-4)
    return torch.no_grad()(lambda: forward(x))


COMPILED_PLAIN, COMPILED_PHI = "plain eval, compiled", "φ single-pass eval, compiled"
COMPILED_PLAIN_STEP, COMPILED_PHI_STEP = "plain step, compiled", "φ step, compiled"


def compiled_eval_fns(plain: torch.nn.Module, phi_model: torch.nn.Module, x: torch.Tensor) -> dict:
    """The plain eval and φ's single pass under torch.compile, φ's on a copy: the other evaluations switch the
    model's noise mode, which its single graph fixes."""
    return {
        COMPILED_PLAIN: compiled_eval_fn(plain, x),
        COMPILED_PHI: compiled_eval_fn(copy.deepcopy(phi_model), x, noise="mean"),
    }


def median_times(fns: dict, repeats: int, warmup: int = 2, device: str = "cpu") -> dict[str, float]:
    """Interleave the candidates so that machine noise hits them alike; median seconds per call (on a GPU,
    each call synchronised)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def saved_bytes(forward) -> tuple[object, int]:
    """forward()'s result and the bytes of the distinct storages autograd keeps from it for the backward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return out, sum(storages.values())


def saved_memory_mb(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Memory (MB) that autograd keeps from a training forward for the backward (distinct storages): what a
    training step needs beyond weights and optimizer state, and what φ's implementation decides."""
    model.train()
    loss, kept = saved_bytes(lambda: F.cross_entropy(model(x), y))
    loss.backward()
    model.zero_grad(set_to_none=True)
    return kept / 2**20


def profile(
    device: str, name: str = "resnet20", size: int = 32, batch_size: int = 128, steps: int = 3, compile: bool = False
) -> str:
    """torch.profiler's table of the plain step, φ's step (its default for `device`) and φ's single-pass eval
    (with `compile`, also the plain eval and the single pass under torch.compile): the operators that make up
    the overhead, sorted by their own time (device time on a GPU)."""
    x = torch.randn(batch_size, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    cuda = device.startswith("cuda")
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    phi_default = DEFAULT_VARIANT
    models = {v: build(name, size, v).to(device) for v in ("plain", phi_default)}
    fns = {
        "plain step": train_step_fn(models["plain"], x, y),
        f"φ step ({phi_default})": train_step_fn(models[phi_default], x, y),
        "φ single-pass eval": eval_fn(models[phi_default], x, noise="mean"),
    }
    if compile:
        fns.update(compiled_eval_fns(models["plain"], models[phi_default], x))
    parts = []
    for label, fn in fns.items():
        fn(), fn()  # warm-up
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                fn()
            if cuda:
                torch.cuda.synchronize()
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=50)
        parts.append(f"### {label}: {name} {size}x{size}, batch {batch_size}, {steps} calls\n\n{table}")
    command = f"python -m benchmarks.overhead --profile --device {device} --batch-size {batch_size}"
    command += " --compile" if compile else ""
    return f"# Profile (`{command}`), {machine()}\n\n" + "\n".join(parts)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--mc-passes", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="3 repeats")
    parser.add_argument("--device", default="cpu", help="cpu (2 threads) or cuda")
    parser.add_argument("--profile", action="store_true", help="profile resnet20 at 32x32 instead of the table")
    parser.add_argument(
        "--compile", action="store_true", help="add the training steps and eval forwards under torch.compile"
    )
    parser.add_argument(
        "--channels-last", action="store_true", help="networks and inputs channels-last (NHWC) instead of NCHW"
    )
    parser.add_argument(
        "--cuda-graph", action="store_true", help="add the training step captured in a CUDA graph (plain, fused φ)"
    )
    parser.add_argument(
        "--keep-freed-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on a CPU, malloc keeps freed memory as the training entry points have it (timm_metaperturb."
        "keep_freed_memory); --no-keep-freed-memory: glibc's defaults, written to its own section",
    )
    args = parser.parse_args(argv)
    if args.cuda_graph and not args.device.startswith("cuda"):
        parser.error("--cuda-graph captures CUDA graphs: it needs --device cuda")
    malloc_defaults, malloc = args.device == "cpu" and not args.keep_freed_memory, ""
    if args.device == "cpu":
        torch.set_num_threads(2)
        kept = args.keep_freed_memory and keep_freed_memory()
        malloc = "malloc keeping freed memory; " if kept else "the C library's malloc defaults; "
    if args.profile:
        text = profile(args.device, batch_size=args.batch_size, compile=args.compile)
        PROFILES.mkdir(exist_ok=True)
        (PROFILES / f"{args.device.split(':')[0]}-resnet20-32.txt").write_text(text)
        print(text)
        return text
    repeats = 3 if args.quick else args.repeats
    phis, singles, default = list(VARIANTS), EVAL_VARIANTS, DEFAULT_VARIANT
    graphed = ("plain", default) if args.cuda_graph else ()
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    rows = []
    for name, size in CONFIGS:
        x = torch.randn(args.batch_size, 3, size, size, device=args.device).contiguous(memory_format=layout)
        y = torch.randint(0, 10, (args.batch_size,), device=args.device)
        models = {v: build(name, size, v).to(args.device, memory_format=layout) for v in ("plain", *phis, "reference")}
        steps = {v: train_step_fn(m, x, y) for v, m in models.items()}
        if args.compile:  # four graphs of the network's forward a config, under dynamo's limit of 8 per function
            torch._dynamo.reset()
            steps[COMPILED_PLAIN_STEP] = train_step_fn(models["plain"], x, y, compile=True)
            steps[COMPILED_PHI_STEP] = train_step_fn(models[default], x, y, compile=True)
        steps.update(
            {
                f"{v} graphed": GraphedTrainStep(build(name, size, v).to(args.device, memory_format=layout), x, y)
                for v in graphed
            }
        )
        evals = {"plain": eval_fn(models["plain"], x)}
        if args.channels_last:  # what the layout itself gains: the plain network as it runs by default
            nchw, x_nchw = build(name, size, "plain").to(args.device), x.contiguous()
            steps[NCHW], evals[NCHW] = train_step_fn(nchw, x_nchw, y), eval_fn(nchw, x_nchw)
        train = median_times(steps, repeats, device=args.device)
        evals.update({f"single pass {v}": eval_fn(models[v], x, noise="mean") for v in singles})
        evals[f"MC-{args.mc_passes}"] = eval_fn(models[default], x, args.mc_passes, noise="sample")
        if args.compile:
            evals.update(compiled_eval_fns(models["plain"], models[default], x))
        evaluation = median_times(evals, repeats, device=args.device)
        memory = {v: saved_memory_mb(m, x, y) for v, m in models.items()}
        rows.append((name, size, train, evaluation, memory))
        print(json.dumps({"model": name, "size": size, "train": train, "eval": evaluation, "memory": memory}))

    mc = f"MC-{args.mc_passes}"
    compiled_columns = (
        " plain step compiled (s) | fused φ step compiled (x plain compiled) | plain eval compiled (s) | single pass "
        "compiled (x plain compiled) |"
        if args.compile
        else ""
    )
    graph = " plain step in a CUDA graph (s) | fused φ step in a CUDA graph (x plain graphed) |" if graphed else ""
    nchw_column = " plain NCHW step / eval (x plain NHWC) |" if args.channels_last else ""
    names = " / ".join(phis)
    lines = [
        f"| network | input | plain step (s) | project φ: {names} | reference φ | plain eval (s) | single pass: "
        f"{' / '.join(singles)} | {mc} |{compiled_columns}{graph}{nchw_column} memory kept for backward, project "
        f"{names} / reference (x plain) |",
        "|" + " --- |" * (9 + 4 * bool(args.compile) + 2 * bool(graphed) + bool(args.channels_last)),
    ]
    for name, size, train, evaluation, memory in rows:
        step = " / ".join(f"{train[v] / train['plain']:.2f}x" for v in phis)
        single = " / ".join(f"{evaluation[f'single pass {v}'] / evaluation['plain']:.2f}x" for v in singles)
        mem = " / ".join(f"{memory[v] / memory['plain']:.2f}" for v in (*phis, "reference"))
        ratio = {k: v / evaluation["plain"] for k, v in evaluation.items()}
        cells = ""
        if args.compile:
            plain_step, plain_eval = train[COMPILED_PLAIN_STEP], evaluation[COMPILED_PLAIN]
            cells = f" {plain_step:.3f} | {train[COMPILED_PHI_STEP] / plain_step:.2f}x |"
            cells += f" {plain_eval:.3f} | {evaluation[COMPILED_PHI] / plain_eval:.2f}x |"
        if graphed:
            plain_graphed = train["plain graphed"]
            cells += f" {plain_graphed:.4f} | {train[f'{default} graphed'] / plain_graphed:.2f}x |"
        if args.channels_last:
            cells += f" {train[NCHW] / train['plain']:.2f}x / {ratio[NCHW]:.2f}x |"
        lines.append(
            f"| {name} | {size}x{size} | {train['plain']:.3f} | {step} | {train['reference'] / train['plain']:.2f}x | "
            f"{evaluation['plain']:.3f} | {single} | {ratio[mc]:.2f}x |{cells} {mem} |"
        )
    command = "python -m benchmarks.overhead " + " ".join(argv if argv is not None else sys.argv[1:])
    variant = [args.device.split(":")[0].upper(), *(["channels-last"] if args.channels_last else []),
               *(["glibc's malloc defaults"] if malloc_defaults else [])]  # fmt: skip
    text = (
        f"## MetaPerturb overhead: {', '.join(variant)} (`benchmarks/overhead.py`)\n\n"
        f"Command: `{command.strip()}`; machine: {machine()}; "
        f"{'2 threads' if args.device == 'cpu' else args.device}; {malloc}batch {args.batch_size}; "
        f"{'networks and inputs channels-last (NHWC)' if args.channels_last else 'NCHW'}; medians of {repeats} "
        "interleaved repeats; ratios to the plain network measured in the same run. Training step = forward, "
        "backward, Adam. Project φ: fused = its fused kernels (the default: C++ on a CPU, `phi/cpu.py`; Triton on "
        "CUDA, `phi/cuda.py`; eps drawn again in the backward), kept / redrawn = on torch operators with eps kept "
        "for the backward / drawn again there from its seed. "
        "Eval: one deterministic pass (noise replaced by its expectation) and "
        f"{mc} ({args.mc_passes} sampled passes, the reference's way, with φ's default for the device)"
        + (
            "; compiled: `torch.compile(model, fullgraph=True)`, default inductor backend, φ's fused kernels in the "
            "graph as operators (the single pass checked against eager)"
            if args.compile
            else ""
        )
        + (
            "; CUDA graph: the whole training step (forward, backward, Adam with capturable state) captured once "
            "and replayed, which leaves the GPU's work without the host's launches"
            if graphed
            else ""
        )
        + ".\n\n"
        + "\n".join(lines)
    )
    print(text)
    section = "overhead" if args.device == "cpu" else f"overhead-{args.device}"
    section += ("-channels-last" if args.channels_last else "") + ("-malloc-defaults" if malloc_defaults else "")
    write_section(section, text)
    return text


if __name__ == "__main__":
    main()
