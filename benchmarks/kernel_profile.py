"""φ's fused CPU kernels alone, called in a loop on one feature map, for a sampling profiler to split their time
among the C++ functions (the torch profiler stops at the kernel call), or to time them against another version:

    perf record -o phi.perf python -m benchmarks.kernel_profile --calls 150
    perf report -i phi.perf --no-children --sort symbol --dso <the kernels' .so, named in perf's output>
    python -m benchmarks.kernel_profile --time    # each kernel's median time instead (interleaved calls)
    python -m benchmarks.kernel_profile --time --march haswell   # the build an older CPU runs (here AVX2)
    git show REV:timm_metaperturb/phi/csrc/phi_cpu.cpp > old.cpp    # an earlier version of the kernels
    python -m benchmarks.kernel_profile --time --against old.cpp   # and that version's, interleaved

One training step's worth at one site, as a frozen φ runs it: the noise path forward with eps drawn from a seed,
its backward drawing eps again, the scale's features (keeping relu's gates) and their backward; then the
deterministic single pass. The default map is resnet20's first stage (128 x 16 x 32 x 32, channels-first), one
thread.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from timm_metaperturb import MetaPerturb
from timm_metaperturb.phi import cpu as phi_cpu
from timm_metaperturb.phi.fused import NO_TABLE
from timm_metaperturb.phi.torch_ops import GRID_LIMIT, GRID_STEP, expected_softplus_table
from timm_metaperturb.training.cpu_memory import keep_freed_memory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=150, help="training steps' worth of kernel calls")
    parser.add_argument("--shape", default="128,16,32,32", help="the feature map, B,C,H,W")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--time", action="store_true", help="print each kernel's median time")
    parser.add_argument("--march", default="native", help="GCC's target for the build (phi_cpu.build)")
    parser.add_argument("--against", type=Path, help="another version of phi_cpu.cpp, timed interleaved with this")
    args = parser.parse_args(argv)
    if phi_cpu.cpu_kernels() is None:
        parser.error("φ's CPU kernels are switched off or cannot be built here: nothing to profile")
    builds = {"": phi_cpu.build(args.march)}
    if args.against is not None:
        builds[f", {args.against}"] = phi_cpu.build(args.march, args.against)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the training loops run them: no page faults on each call's fresh outputs
    torch.manual_seed(0)
    x = torch.randn(*map(int, args.shape.split(",")))
    calls = {f"{name}{build}": call for build, kernels in builds.items() for name, call in kernel_calls(kernels, x)}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.calls):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    if args.time:
        print(f"{args.shape}, -march={args.march}, {args.threads} thread(s), medians of {args.calls} interleaved calls")
        for name, values in times.items():
            print(f"  {name}: {statistics.median(values) * 1e3:.2f} ms")


def kernel_calls(kernels: ModuleType, x: torch.Tensor) -> list[tuple[str, Callable[[], object]]]:
    """A frozen φ's kernel calls at one site for the map x: a training step's, then the single pass."""
    phi = MetaPerturb().requires_grad_(False)
    grad, s = torch.randn_like(x), torch.rand(x.shape[1])
    weights, scale_kernels = phi.noise_weights(), phi.scale_kernels.float()
    grad_features = torch.randn(x.shape[0], x.shape[1], phi.h_dim)
    gates = kernels.scale_features_forward(x, scale_kernels, True)[1]
    table = (*expected_softplus_table(x.device, x.dtype), GRID_LIMIT, GRID_STEP)
    return [
        (
            "noise path forward",
            lambda: kernels.perturb_forward(x, None, 7, s, *weights, *NO_TABLE, 1.0, phi.clip, False),
        ),
        ("noise path backward", lambda: kernels.perturb_backward(grad, x, None, 7, s, *weights, 1.0, phi.clip, False)),
        ("scale features forward", lambda: kernels.scale_features_forward(x, scale_kernels, True)),
        (
            "scale features backward",
            lambda: kernels.scale_features_backward(grad_features, x, gates, scale_kernels, False),
        ),
        ("single pass", lambda: kernels.perturb_forward(x, None, None, s, *weights, *table, 1.0, phi.clip, False)),
    ]


if __name__ == "__main__":
    main()
