"""Where φ earns its cost: accuracy and calibration under corruption, every row of the transfer table side by side.

    python -m benchmarks.robustness --quick   # seed 0, resnet20 on Fashion-MNIST 5-9: one run per row
    python -m benchmarks.robustness           # resnet20 and conv4 on Fashion-MNIST 5-9 and digits, 3 seeds
    python -m benchmarks.robustness --quick --adversarial 1000   # and L∞ PGD on 1,000 test images

Rows: the transfer table's (base, the three baselines, the shipped and the authors' φ) and the robustness anchors a
user would otherwise pick, alone and with φ: Gaussian noise augmentation (`--noise-augment 0.2`) and AugMix
(`--augmix 3`, its augmentation without its consistency loss).

Each run is one `train/target.py` process of the transfer table's recipe (800 steps) with `--corruptions 1000`: the
run's default evaluation (MetaPerturb: noise at its expectation, batch norm re-estimated; baselines: batch norm
re-estimated) on 1,000 test images, clean and under imagecorruptions' 15 types at 5 severities, the same images for
every row (`timm_metaperturb/training/corruptions.py`). Finished runs are skipped, so the table resumes where it
stopped. mCE is Hendrycks & Dietterich's: per type, the row's errors summed over severities over base's on the same
seed, averaged over types (base = 100).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks.results import RESULTS, machine, write_section
from benchmarks.transfer import AUTHORS_PHI, CELLS, STEPS, Cell, recipe, report, rows, run_dir, table_jobs
from timm_metaperturb.training.corruptions import CORRUPTIONS, FAMILIES
from train.compare import add_workers_argument, mean_std, run_all

RUNS = Path(__file__).with_name("runs")  # runs/<device>-robustness
IMAGES = 1000  # test images per cell, each under 75 corruptions
ROBUSTNESS_CELLS = [c for c in CELLS if c[1] in ("resnet20", "conv4")]
QUICK_CELL: Cell = ("fmnist5-9", "resnet20")
NOISE_AUGMENT = "0.2"  # the largest std of the noise augmentation rows (pixels in [0, 1])
ANCHORS = {  # what a user would otherwise train for robustness, alone and with φ
    "noise_augment": ["--method", "base", "--noise-augment", NOISE_AUGMENT],
    "noise_augment+metaperturb": ["--method", "metaperturb", "--noise-augment", NOISE_AUGMENT],
    "augmix": ["--method", "base", "--augmix", "3"],
    "augmix+metaperturb": ["--method", "metaperturb", "--augmix", "3"],
}
GROUPS = {"corrupted": CORRUPTIONS, **FAMILIES}  # every type, then each family
TABLES = {  # the columns of each table of a cell: (metric, group or "clean")
    "accuracy (%)": [("accuracy", "clean"), *(("accuracy", g) for g in GROUPS), ("mCE", "corrupted")],
    "calibration: ECE (%) and NLL": [(metric, g) for metric in ("ece", "nll") for g in ("clean", *GROUPS)],
}


def run_summary(run: dict) -> dict[tuple[str, str], float]:
    """One run's numbers keyed (metric, group): each metric clean and averaged over every type and severity of a
    group, its errors per type summed over severities (for mCE), and its adversarial accuracy per eps if measured."""
    result = run["corruptions"]
    summary = {(metric, "clean"): result["clean"][metric] for metric in ("accuracy", "ece", "nll")}
    for group, types in GROUPS.items():
        every = [m for t in types for m in result["corrupted"][t].values()]
        summary.update(
            {(metric, group): statistics.mean(m[metric] for m in every) for metric in ("accuracy", "ece", "nll")}
        )
    for t in CORRUPTIONS:
        summary[("errors", t)] = sum(100 - m["accuracy"] for m in result["corrupted"][t].values())
    for eps, accuracy in (run.get("adversarial") or {}).get("accuracy", {}).items():
        summary[("adversarial", eps)] = accuracy
    return summary


def finished(runs: Path, cell: Cell, row: str, seeds: list[int]) -> dict[int, dict]:
    """Each finished run's summary, by seed."""
    found = {}
    for seed in seeds:
        path = run_dir(runs, cell, row, seed) / "run.json"
        if path.is_file():
            found[seed] = run_summary(json.loads(path.read_text()))
    return found


def corruption_error(row: dict[int, dict], base: dict[int, dict]) -> list[float]:
    """mCE (base = 100) on each seed both have: per type, errors over base's errors, averaged over types."""
    return [
        100 * statistics.mean(row[s][("errors", t)] / max(base[s][("errors", t)], 1e-9) for t in CORRUPTIONS)
        for s in row
        if s in base
    ]


def cell_tables(runs: Path, cell: Cell, names: list[str], seeds: list[int]) -> str:
    """Mean ± std over seeds of each table's columns (and of adversarial accuracy, where measured), for each row
    that finished on this cell."""
    base = finished(runs, cell, "base", seeds)
    by_row = {name: found for name in names if (found := finished(runs, cell, name, seeds))}
    eps = sorted({key[1] for found in by_row.values() for r in found.values() for key in r if key[0] == "adversarial"},
                 key=lambda e: float(e.split("/")[0]))  # fmt: skip
    tables = {**TABLES, **({"accuracy (%) under L∞ PGD, eps": [("adversarial", e) for e in eps]} if eps else {})}
    text = []
    for title, columns in tables.items():
        labels = [group if metric in ("accuracy", "adversarial", "mCE") else f"{metric.upper()} {group}"
                  for metric, group in columns]  # fmt: skip
        lines = [f"**{cell[1]} on {cell[0]}, {title}**", "", "| row | " + " | ".join(labels) + " | seeds |",
                 "| --- |" + " --- |" * (len(columns) + 1)]  # fmt: skip
        for name, found in by_row.items():
            values = [corruption_error(found, base) if metric == "mCE" else
                      [r[(metric, group)] for r in found.values() if (metric, group) in r]
                      for metric, group in columns]  # fmt: skip
            cells = [mean_std(v, 3 if metric == "nll" else 2) if v else "–"
                     for v, (metric, _) in zip(values, columns, strict=True)]  # fmt: skip
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(found)} |")
        text.append("\n".join(lines))
    return "\n\n".join(text)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="seed 0, resnet20 on Fashion-MNIST 5-9")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rows", help="only these rows, e.g. base,metaperturb")
    parser.add_argument(
        "--phi-row", action="append", default=[], metavar="NAME=PATH", help="add a row metaperturb-NAME with this φ"
    )
    parser.add_argument("--cells", help="only these target:network cells, e.g. digits:conv4")
    parser.add_argument("--images", type=int, default=IMAGES, help="test images per cell under each corruption")
    parser.add_argument("--adversarial", type=int, default=0, help="test images per cell under PGD (0: no attack)")
    parser.add_argument("--authors-phi", type=Path, default=AUTHORS_PHI, help="the authors' φ; row left out if absent")
    parser.add_argument("--runs-dir", type=Path, help="default: benchmarks/runs/<device>-robustness")
    add_workers_argument(parser)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the Markdown file the tables go to")
    parser.add_argument("--table-only", action="store_true", help="tabulate the finished runs, run nothing")
    args = parser.parse_args(argv)
    runs = args.runs_dir or RUNS / f"{args.device.split(':')[0]}-robustness"
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    cells = [QUICK_CELL] if args.quick else ROBUSTNESS_CELLS
    if args.cells:
        wanted = [tuple(c.split(":")) for c in args.cells.split(",")]
        if unknown := [c for c in wanted if c not in ROBUSTNESS_CELLS]:
            parser.error(f"unknown cells {unknown}; choose from {', '.join(f'{t}:{n}' for t, n in ROBUSTNESS_CELLS)}")
        cells = wanted
    phis = dict(item.split("=", 1) for item in args.phi_row if "=" in item)
    if len(phis) != len(args.phi_row):
        parser.error("--phi-row takes NAME=PATH, e.g. robust=outputs/meta-robust/phi")
    table_rows = rows(args.authors_phi if args.authors_phi.is_file() else None, phis, ablation=False) | ANCHORS
    if args.rows:
        if unknown_rows := set(args.rows.split(",")) - set(table_rows):
            parser.error(f"unknown rows {unknown_rows}; choose from {', '.join(table_rows)}")
        table_rows = {k: v for k, v in table_rows.items() if k in args.rows.split(",")}
    extra = ["--corruptions", str(args.images), "--adversarial", str(args.adversarial)]
    jobs = table_jobs(runs, cells, table_rows, seeds, [*recipe(STEPS, "mean-bn", args.device), *extra])
    started = time.time()
    failures = [] if args.table_only else run_all(jobs, args.workers)
    done = sum((out / "run.json").is_file() for out, _ in jobs)
    command = "python -m benchmarks.robustness " + " ".join(sys.argv[1:] if argv is None else argv)
    text = "\n\n".join(
        [
            f"## Robustness to corruption: {args.device.split(':')[0].upper()}, {STEPS} steps"
            f"{', quick' if args.quick else ''} (`benchmarks/robustness.py`)",
            f"Command: `{command.strip()}`; machine: {machine()}; {args.workers} workers; seeds "
            f"{','.join(map(str, seeds))}; {done} of {len(jobs)} runs finished (this invocation: "
            f"{(time.time() - started) / 60:.1f} min wall). {args.images} test images per cell, each clean and under "
            f"{len(CORRUPTIONS)} corruption types x 5 severities (imagecorruptions); columns: clean and mean corrupted "
            "accuracy, mean accuracy per family, mCE against base (100 = base's errors), ECE clean and under "
            "corruption, NLL under corruption. Every row in its default evaluation.",
            *(cell_tables(runs, cell, list(table_rows), seeds) for cell in cells),
        ]
    )
    write_section("robustness" + ("-quick" if args.quick else ""), text, args.results)
    return report(text, failures)


if __name__ == "__main__":
    main()
