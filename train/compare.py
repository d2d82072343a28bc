"""Run several methods x seeds of train/target.py on one dataset and network, and print a table of
mean ± std (the shape of the paper's tables), written as Markdown.

    python train/compare.py --runs-dir outputs/compare --methods base,metaperturb,dropblock --seeds 0,1,2 \\
        -- --dataset fashion_mnist --classes 5-9 --max-per-class 100 --steps 800

Everything after `--` is passed to train/target.py. Each run writes its JSON to RUNS_DIR/<method>/seed<seed>;
runs whose run.json exists are skipped, and a run cut off continues from its last checkpoint (every 500 steps),
so an interrupted comparison resumes where it stopped. --workers runs that many at once, the cores shared out
between them; with two drivers at once, set OMP_NUM_THREADS for each.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from timm_metaperturb.command_line import run_main

TARGET = Path(__file__).with_name("target.py")
METRICS = (("accuracy", "accuracy (%)", 2), ("nll", "NLL", 3), ("ece", "ECE (%)", 2))
CHECKPOINT_EVERY = 500  # steps: a run cut off (a killed job, a machine taken back) loses at most this many


def run_one(output: Path, target_args: list[str], threads: int) -> Path:
    """One run of train/target.py in its own process, writing to `output`; skipped when its run.json exists."""
    if (output / "run.json").is_file():
        return output
    output.mkdir(parents=True, exist_ok=True)
    resumable = ["--checkpoint-every", str(CHECKPOINT_EVERY), "--resume"]  # before target_args, which may override
    command = [sys.executable, str(TARGET), *resumable, *target_args, "--output", str(output), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(output / "log.txt", "a") as log:
        done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(target_args)} failed (exit {done.returncode}); see {output / 'log.txt'}")
    return output


def threads_per_run(workers: int) -> int:
    """OMP_NUM_THREADS where the user set it, otherwise the cores shared out between the workers. Two drivers side
    by side must be given OMP_NUM_THREADS: each sharing out every core oversubscribes them, and OpenMP's waiting
    threads then slow every run several times over. OpenMP's nested form ("4,2") counts by its first level."""
    setting = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if not setting:
        return max(1, (os.cpu_count() or 1) // workers)
    if not setting.isdigit() or int(setting) < 1:
        raise ValueError(
            f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']!r} is not a thread count: set it to a positive integer "
            "(threads per run) or unset it to share the cores out between --workers"
        )
    return int(setting)


def add_workers_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="runs at a time, the cores shared out between them (OMP_NUM_THREADS, if set, per run)",
    )


def run_all(jobs: list[tuple[Path, list[str]]], workers: int) -> list[str]:
    """Run (output, target arguments) jobs, `workers` at a time, each with `threads_per_run` threads. A failed run
    does not stop the others; returns the failures' messages."""
    threads = threads_per_run(workers)
    failures = []
    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(run_one, output, args, threads) for output, args in jobs]:
            try:
                future.result()
            except RuntimeError as error:
                failures.append(str(error))
    return failures


def mean_std(values: list[float], digits: int) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def comparison_table(runs_dir: Path, methods: list[str], seeds: list[int]) -> str:
    """Mean ± std over seeds of the final metrics of each method."""
    lines = ["| method | " + " | ".join(label for _, label, _ in METRICS) + " | runs |",
             "| --- |" + " --- |" * (len(METRICS) + 1)]  # fmt: skip
    for method in methods:
        runs = [
            json.loads(p.read_text())["final"]
            for seed in seeds
            if (p := runs_dir / method / f"seed{seed}" / "run.json").is_file()
        ]
        if runs:
            cells = [mean_std([r[key] for r in runs], digits) for key, _, digits in METRICS]
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {len(runs)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    ours, target_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", type=Path, required=True)
    parser.add_argument(
        "--methods",
        default="base,metaperturb,information_dropout,dropblock,manifold_mixup",
        help="comma-separated; combine methods in one run with '+', e.g. metaperturb+manifold_mixup",
    )
    parser.add_argument("--seeds", default="0,1,2")
    add_workers_argument(parser)
    args = parser.parse_args(ours)
    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [
        (args.runs_dir / m / f"seed{s}", [*target_args, "--method", m, "--seed", str(s)])
        for s in seeds
        for m in methods
    ]
    failures = run_all(jobs, args.workers)
    if failures:
        raise RuntimeError("\n".join(failures))
    table = comparison_table(args.runs_dir, methods, seeds)
    (args.runs_dir / "table.md").write_text(table + "\n")
    print(table)
    return table


if __name__ == "__main__":
    run_main(main)
