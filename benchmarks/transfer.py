"""Where a regularizer matters: data-scarce targets, every baseline, 3 seeds, tables in RESULTS.md.

    python -m benchmarks.transfer --quick     # one seed, resnet20 only (about an hour on 2 CPU cores)
    python -m benchmarks.transfer             # the full table: 5 target x network cells, 6 rows, 3 seeds
    python -m benchmarks.transfer --regime    # base vs MetaPerturb at 20, 50, 100, 500 images per class
    python -m benchmarks.transfer --suite     # many-class targets with a style shift (rendered letters), φ vs base
    python -m benchmarks.transfer --suite --quick   # 4 of them, base and the shipped φ (under an hour on 2 cores)
    python -m benchmarks.transfer --ablation  # what each part of MetaPerturb contributes (resnet20, Fashion-MNIST)
    python -m benchmarks.transfer --selection --rows base,metaperturb-s1 --phi-row s1=outputs/meta-s1/phi
                                              # choose among meta-training runs on scripts none of them saw
    python -m benchmarks.transfer --phi-row meta150=outputs/meta-150/phi   # a row for another φ
    python -m benchmarks.transfer --rows base,metaperturb+manifold_mixup   # a combination row: do they add up?

Each run is one `train/target.py` process (one worker per core, the cores shared out), its JSON written to
benchmarks/runs/<cell>/<row>/seed<k>/run.json; a run whose run.json exists is skipped, and a run cut off
continues from its last checkpoint (every 500 steps), so an interrupted table resumes where it stopped.
MetaPerturb rows report every evaluation mode: one sampled pass, Monte-Carlo over 10 and 100 passes, and the
deterministic pass with the noise replaced by its expectation ("mean").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.results import RESULTS, machine, write_section
from train.compare import add_workers_argument, mean_std, run_all

RUNS = Path(__file__).with_name("runs")  # one folder per device kind and length: runs/cpu, runs/cuda-10000steps
STEPS = 800  # every row of the table; the paper's 10,000 where a GPU allows it (--steps)
AUTHORS_PHI = Path(__file__).resolve().parents[2] / "shared" / "reference" / "official_phi_tin_resnet20.pth"
TARGETS = {
    "fmnist5-9": ["--dataset", "fashion_mnist", "--classes", "5-9", "--max-per-class", "100"],
    "digits": ["--dataset", "digits", "--max-per-class", "20", "--test-rest", "--no-hflip"],
}
# targets unlike the source: 27-92 classes, 8-24 training images per class (training sets of 528-1,056 images, none
# a multiple of a batch), test letters drawn from other fonts than the training letters (training/glyphs.py)
SUITE = {"hebrew": 20, "thai": 15, "kana": 10, "devanagari": 24, "georgian": 16, "ethiopic": 8}
TARGETS.update({f"{script}@{n}": ["--dataset", f"glyphs-{script}", "--max-per-class", str(n), "--no-hflip"]
                for script, n in SUITE.items()})  # fmt: skip
# choosing among meta-training runs (the paper keeps the best of 5 on held-out data): the letters of the last three
# source scripts (malayalam, gurmukhi, lao; 111 classes), held out from every φ meta-trained on source classes 0-114
# and from every target
TARGETS["heldout"] = ["--dataset", "glyphs-sources", "--classes", "115-225", "--no-hflip"]
Cell = tuple[str, str]  # (target, network)
SELECTION_CELL: Cell = ("heldout@10", "resnet20")
CELLS = [("fmnist5-9", "resnet20"), ("digits", "resnet20"), ("fmnist5-9", "conv4"), ("digits", "conv4"),
         ("fmnist5-9", "resnet18")]  # fmt: skip
REGIME_SIZES = (20, 50, 100, 500)  # training images per class, resnet20 on Fashion-MNIST 5-9
BASELINES = ["base", "information_dropout", "dropblock", "manifold_mixup"]
ABLATION_CELL = ("fmnist5-9", "resnet20")
ABLATIONS = {  # rows beside base and metaperturb on ABLATION_CELL: one change each to the shipped φ's run
    "metaperturb-output-placement": ["--placement", "output"],  # after the block's activation, not before it
    "metaperturb-no-annealing": ["--anneal", "0"],  # full strength from the first step
    "metaperturb-anneal-70": ["--anneal", "0.7"],  # strength rising over 70% of the steps (default 40%)
    "metaperturb-anneal-100": ["--anneal", "1"],  # rising over the whole run: full strength at the last step
    "metaperturb-no-scale": ["--phi-components", "noise"],  # s fixed to 1
    "metaperturb-no-noise": ["--phi-components", "scale"],  # z fixed to 1: a deterministic channel scale
}
METRICS = (("accuracy", 2), ("nll", 3), ("ece", 2))
# what every row is also paired with: the shipped φ in its default evaluation (one deterministic pass, batch norm
# re-estimated), so that "does φ beat this row?" reads off the table, seed by seed, with its standard error
PHI_DEFAULT = ("metaperturb", "mean-bn")
SETUP = (
    "Fashion-MNIST classes 5-9: 100 training images per class, all 5,000 test images; digits: 20 per class, the "
    "other 1,597 as test, no horizontal flip. Rows: metaperturb = the shipped φ, metaperturb-authors = the "
    "authors' φ (`official_phi_tin_resnet20.pth`). MetaPerturb evaluations: sample-N = Monte-Carlo over N sampled "
    "passes, mean = one pass with the noise replaced by its expectation, mean-bn = the same after batch norm's "
    "statistics are re-estimated in that mode on the training images; baselines are deterministic (final). The "
    "last two columns pair runs by seed (same training images, same initialisation): a row minus base, and the "
    "shipped φ's default (metaperturb, mean-bn) minus the row, which is positive where φ beats it."
)
SUITE_SETUP = (
    "Targets glyphs-SCRIPT@N: the letters of one script (27 to 92 classes), N training images per class rendered "
    "from sans-serif fonts, 30 test images per class from serif, handwritten or brush fonts (`timm_metaperturb/"
    "training/glyphs.py`), no horizontal flip. No script here is a meta-training source of any φ in the table."
)

SELECTION_SETUP = (
    "Target heldout@10: the letters of malayalam, gurmukhi and lao (glyphs-sources classes 115-225, 111 classes), 10 "
    "training images per class from sans-serif fonts, test letters from serif and looped fonts. These scripts are "
    "meta-training sources of no φ compared here (all meta-trained on source classes 0-99) and targets of no table: "
    "they choose among meta-training runs, as the paper keeps the best of 5 on held-out data."
)

ABLATION_SETUP = (
    "Ablation rows, each one change to the shipped φ's run (metaperturb): output-placement = φ after each block's "
    "closing activation instead of before it; no-annealing = strength k = 1 from the first step (default: rising "
    "over 40% of the steps); anneal-N = rising over N% of the steps; no-scale = s fixed to 1 (only the noise z); "
    "no-noise = z fixed to 1 (only the channel scale s); metaperturb-NAME rows = another φ (`--phi-row`), e.g. one "
    "meta-trained for fewer steps."
)


def target_args(target: str) -> list[str]:
    """A target's train/target.py arguments; "name@N" is that target with N training images per class."""
    if target in TARGETS:
        return TARGETS[target]
    name, _, per_class = target.partition("@")
    return TARGETS[name] + ["--max-per-class", per_class]


def regime_cell(per_class: int) -> Cell:
    return ("fmnist5-9" if per_class == 100 else f"fmnist5-9@{per_class}", "resnet20")


def regime_plot(runs: Path, seeds: list[int], path: Path) -> None:
    """Test accuracy against training images per class, base and each MetaPerturb evaluation, mean ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[tuple[int, float, float]]] = {}
    for n in REGIME_SIZES:
        for row in ("base", "metaperturb"):
            for mode, metrics in results(runs, regime_cell(n), row, seeds).items():
                accs = [m["accuracy"] for m in metrics]
                std = statistics.stdev(accs) if len(accs) > 1 else 0.0
                curves.setdefault(f"{row} ({mode})", []).append((n, statistics.mean(accs), std))
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        ax.errorbar(*zip(*points, strict=True), marker="o", capsize=3, label=label)
    ax.set(xscale="log", xlabel="training images per class", ylabel="test accuracy (%)",
           title="resnet20, Fashion-MNIST classes 5-9, 800 steps")  # fmt: skip
    ax.set_xticks(REGIME_SIZES, [str(n) for n in REGIME_SIZES])
    ax.minorticks_off()  # the log axis' own labels would overprint these
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def card_rows(runs: Path, cells: list[Cell], seeds: list[int], source: str) -> list[dict]:
    """The shipped φ's transfer rows for its model card: mean accuracy of base and of each MetaPerturb
    evaluation (the shipped φ and the authors'), per cell."""
    table = []
    for cell in cells:
        row = {"target": cell[0], "network": cell[1]}
        for name in ("base", "metaperturb", "metaperturb-authors"):
            for mode, metrics in results(runs, cell, name, seeds).items():
                if mode in ("final", "sample-1", "sample-10", "mean-bn"):
                    label = "base" if name == "base" else f"{name.replace('metaperturb', 'φ')} {mode}"
                    row[label] = f"{statistics.mean(m['accuracy'] for m in metrics):.2f} ({len(metrics)})"
        table.append({**row, "measured": source})
    return table


def _card_key(row: dict) -> tuple[str, str, str]:
    return row["target"], row["network"], row["measured"]


def merge_card_rows(kept: list[dict], new: list[dict]) -> list[dict]:
    """The card's rows with `new` in place of those it measures again (same target, network and measurement),
    in their places, and the rest of `new` after them: tables of other lengths or devices stay on the card."""
    fresh = {_card_key(row): row for row in new}
    merged = [fresh.pop(_card_key(row), row) for row in kept]
    return merged + list(fresh.values())


def update_default_card(rows: list[dict]) -> None:
    """Merge transfer rows into the shipped φ's provenance and rewrite its folder (weights unchanged) and card."""
    from timm_metaperturb import load_phi
    from timm_metaperturb.loading import DEFAULT_PHI_DIR

    phi = load_phi(None)
    phi.provenance["results"] = merge_card_rows(phi.provenance.get("results", []), rows)
    (DEFAULT_PHI_DIR / "README.md").unlink(missing_ok=True)  # save_pretrained writes a card only where none is
    phi.save_pretrained(DEFAULT_PHI_DIR, model_card_kwargs={"phi_source": None})


def rows(
    authors_phi: Path | None, phis: dict[str, str], ablation: bool, baselines: bool = True
) -> dict[str, list[str]]:
    """Table rows and the train/target.py arguments of each: base and (with `baselines`) the other baselines;
    MetaPerturb with the shipped φ, the authors' (when there) and each of `phis` (row name: path); with `ablation`,
    the ablations (and no other baseline)."""
    table = {name: ["--method", name] for name in (BASELINES if baselines and not ablation else ["base"])}
    table["metaperturb"] = ["--method", "metaperturb"]  # the shipped φ, meta-trained by this project
    if authors_phi is not None:
        table["metaperturb-authors"] = ["--method", "metaperturb", "--phi", str(authors_phi)]
    for name, path in phis.items():
        table[f"metaperturb-{name}"] = ["--method", "metaperturb", "--phi", path]
    if ablation:
        table.update({name: ["--method", "metaperturb", *extra] for name, extra in ABLATIONS.items()})
    return table


def is_combination(row: str) -> bool:
    """A row like metaperturb+manifold_mixup: two or more of the table's methods trained together (the shipped φ)."""
    methods = row.split("+")
    return len(methods) > 1 and len(set(methods)) == len(methods) and set(methods) <= {*BASELINES[1:], "metaperturb"}


def recipe(steps: int, modes: str, device: str) -> list[str]:
    """The train/target.py arguments every run of a table shares: every evaluation the table reads comes from
    --final-modes; the run's own final one is a single sampled pass."""
    return ["--steps", str(steps), "--eval-every", str(steps), "--eval-noise", "sample", "--final-passes", "1",
            "--final-modes", modes, "--no-plots", "--device", device]  # fmt: skip


def table_jobs(runs: Path, cells: list[Cell], table_rows: dict[str, list[str]], seeds: list[int],
               common: list[str]) -> list[tuple[Path, list[str]]]:  # fmt: skip
    """(run folder, train/target.py arguments) of every seed, cell and row."""
    return [
        (
            run_dir(runs, cell, row, seed),
            [*target_args(cell[0]), "--model", cell[1], *extra, *common, "--seed", str(seed)],
        )
        for seed in seeds
        for cell in cells
        for row, extra in table_rows.items()
    ]


def run_dir(runs: Path, cell: Cell, row: str, seed: int) -> Path:
    return runs / f"{cell[0]}-{cell[1]}" / row / f"seed{seed}"


def results(runs: Path, cell: Cell, row: str, seeds: list[int]) -> dict[str, list[dict]]:
    """Finished runs' metrics per evaluation: "final" (baselines) or each MetaPerturb evaluation mode, each with
    the run's seed."""
    found: dict[str, list[dict]] = {}
    for seed in seeds:
        path = run_dir(runs, cell, row, seed) / "run.json"
        if path.is_file():
            run = json.loads(path.read_text())
            for mode, metrics in (run.get("evaluations") or {"final": run["final"]}).items():
                found.setdefault(mode, []).append({**metrics, "seed": seed})
    return found


def accuracy_by_seed(runs: Path, cell: Cell, row: str, mode: str, seeds: list[int]) -> dict[int, float]:
    return {m["seed"]: m["accuracy"] for m in results(runs, cell, row, seeds).get(mode, [])}


def seed_gains(metrics: list[dict], base: dict[int, float]) -> list[float]:
    """Accuracy minus base's on the same seed, for each seed base also has: a seed draws the training images and
    the initialisation for every row alike, so pairing removes most of the seed-to-seed spread."""
    return [m["accuracy"] - base[m["seed"]] for m in metrics if m["seed"] in base]


def phi_leads(metrics: list[dict], phi: dict[int, float]) -> list[float]:
    """The shipped φ's default accuracy minus this row's, on each seed both have."""
    return [phi[m["seed"]] - m["accuracy"] for m in metrics if m["seed"] in phi]


def paired_mean(differences: list[float]) -> str:
    """Mean of per-seed differences (standard error)."""
    if len(differences) < 2:
        return f"{differences[0]:+.2f}" if differences else "–"
    mean, spread = statistics.mean(differences), statistics.stdev(differences)
    return f"{mean:+.2f} ({spread / math.sqrt(len(differences)):.2f})"


def cell_table(runs: Path, cell: Cell, names: list[str], seeds: list[int]) -> str:
    header = (
        "| row | evaluation | accuracy (%) | NLL | ECE (%) | seeds | minus base, same seeds (standard error) | "
        "shipped φ's default minus this, same seeds (standard error) |"
    )
    lines = [f"**{cell[1]} on {cell[0]}**", "", header, "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    base = accuracy_by_seed(runs, cell, "base", "final", seeds)
    phi = accuracy_by_seed(runs, cell, *PHI_DEFAULT, seeds)
    for row in names:
        for mode, metrics in results(runs, cell, row, seeds).items():
            cells = [mean_std([m[key] for m in metrics], digits) for key, digits in METRICS]
            pairs = [paired_mean(seed_gains(metrics, base)), paired_mean(phi_leads(metrics, phi))]
            lines.append("| " + " | ".join([row, mode, *cells, str(len(metrics)), *pairs]) + " |")
    return "\n".join(lines)


def summary(runs: Path, cells: list[Cell], names: list[str], seeds: list[int]) -> str:
    """Mean accuracy of each row and evaluation over the cells where it finished, its gain over base and the shipped
    φ's lead over it on those same cells and seeds (a row with fewer cells or seeds than base is compared like for
    like, not left out)."""
    per_row: dict[tuple[str, str], dict[Cell, list[dict]]] = {}  # (row, evaluation): its runs per cell
    base: dict[Cell, dict[int, float]] = {}
    phi: dict[Cell, dict[int, float]] = {}
    for cell in cells:
        base[cell] = accuracy_by_seed(runs, cell, "base", "final", seeds)
        phi[cell] = accuracy_by_seed(runs, cell, *PHI_DEFAULT, seeds)
        for row in names:
            for mode, metrics in results(runs, cell, row, seeds).items():
                per_row.setdefault((row, mode), {})[cell] = metrics
    lines = [
        "| row | evaluation | mean accuracy over cells (%) | minus base, same cells and seeds | shipped φ's default "
        "minus this, same cells and seeds | cells |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (row, mode), by_cell in per_row.items():
        pairs = [cell_means(by_cell, base, seed_gains), cell_means(by_cell, phi, phi_leads)]
        accuracy = statistics.mean(statistics.mean(m["accuracy"] for m in metrics) for metrics in by_cell.values())
        lines.append(f"| {row} | {mode} | {accuracy:.2f} | " + " | ".join(pairs) + f" | {len(by_cell)} |")
    return "\n".join(lines)


def cell_means(
    by_cell: dict[Cell, list[dict]],
    reference: dict[Cell, dict[int, float]],
    differences: Callable[[list[dict], dict[int, float]], list[float]],
) -> str:
    """The mean over cells of each cell's mean paired difference against `reference`, with the number of cells in
    brackets where the reference lacks some of the row's."""
    means = [statistics.mean(d) for cell, metrics in by_cell.items() if (d := differences(metrics, reference[cell]))]
    text = "–" if not means else f"{statistics.mean(means):+.2f}"
    return text + ("" if len(means) in (0, len(by_cell)) else f" ({len(means)})")


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="seed 0 and resnet20 only (--suite: 4 targets, base and the shipped φ)"
    )
    parser.add_argument("--regime", action="store_true", help="base vs MetaPerturb against images per class")
    parser.add_argument("--ablation", action="store_true", help="the ablation rows on resnet20 / Fashion-MNIST 5-9")
    parser.add_argument("--suite", action="store_true", help="the many-class, style-shifted targets, resnet20")
    parser.add_argument("--selection", action="store_true", help="the held-out scripts that choose among φs")
    parser.add_argument(
        "--phi-row", action="append", default=[], metavar="NAME=PATH", help="add a row metaperturb-NAME with this φ"
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument(
        "--modes", help="MetaPerturb's final evaluations (default 1,10,100,mean,mean-bn; --quick: no 100)"
    )
    parser.add_argument(
        "--authors-phi", type=Path, default=AUTHORS_PHI, help="the authors' φ (.pth); row skipped if absent"
    )
    parser.add_argument("--runs-dir", type=Path, help="default: benchmarks/runs/<device>[-<steps>steps]")
    add_workers_argument(parser)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cells", help="only these target:network cells, e.g. digits:resnet20,fmnist5-9:conv4")
    parser.add_argument("--rows", help="only these rows, e.g. base,metaperturb")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the Markdown file the tables go to")
    parser.add_argument("--table-only", action="store_true", help="tabulate the finished runs, run nothing")
    parser.add_argument("--machine", default=machine(), help="where the runs ran (for --table-only elsewhere)")
    parser.add_argument("--update-card", action="store_true", help="write these rows into the shipped φ's card")
    args = parser.parse_args(argv)
    length = "" if args.steps == STEPS else f"-{args.steps}steps"  # runs of another length are another table
    args.runs_dir = args.runs_dir or RUNS / (args.device.split(":")[0] + length)
    args.modes = args.modes or ("1,10,mean,mean-bn" if args.quick else "1,10,100,mean,mean-bn")
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    cells = [c for c in CELLS if c[1] == "resnet20"] if args.quick else CELLS
    if args.regime:
        cells, args.rows = [regime_cell(n) for n in REGIME_SIZES], args.rows or "base,metaperturb"
    if args.ablation:  # on the ablation cell, or on any cell --cells names
        cells = CELLS if args.cells else [ABLATION_CELL]
    if args.suite:  # φ against base; --quick: the first four targets and the shipped φ alone (under an hour)
        scripts = list(SUITE)[:4] if args.quick else list(SUITE)
        cells = [(f"{s}@{SUITE[s]}", network) for network in ("resnet20", "conv4") for s in scripts]
        cells = cells if args.cells else [c for c in cells if c[1] == "resnet20"]
        args.rows = args.rows or ("base,metaperturb" if args.quick else None)
    if args.selection:
        cells = [SELECTION_CELL]
    phis = dict(item.split("=", 1) for item in args.phi_row if "=" in item)
    if len(phis) != len(args.phi_row):
        parser.error("--phi-row takes NAME=PATH, e.g. meta150=outputs/meta-150/phi")
    if args.cells:
        wanted = [tuple(c.split(":")) for c in args.cells.split(",")]
        unknown = [c for c in wanted if c not in cells]
        if unknown:
            parser.error(f"unknown cells {unknown}; choose from {', '.join(f'{t}:{n}' for t, n in cells)}")
        cells = [c for c in cells if c in wanted]
    authors = args.authors_phi if args.authors_phi.is_file() else None
    if authors is None:
        print(f"the authors' φ is not at {args.authors_phi}: its row is left out", file=sys.stderr)
    table_rows = rows(authors, phis, args.ablation, baselines=not (args.suite or args.selection))
    if args.rows:
        wanted_rows = args.rows.split(",")
        table_rows.update({row: ["--method", row] for row in wanted_rows if is_combination(row)})
        if set(wanted_rows) - set(table_rows):
            parser.error(
                f"unknown rows {set(wanted_rows) - set(table_rows)}; choose from {', '.join(table_rows)}, or "
                "combine methods with +, e.g. metaperturb+manifold_mixup"
            )
        table_rows = {k: v for k, v in table_rows.items() if k in wanted_rows}
    jobs = table_jobs(args.runs_dir, cells, table_rows, seeds, recipe(args.steps, args.modes, args.device))
    started = time.time()
    failures = [] if args.table_only else run_all(jobs, args.workers)
    names = list(table_rows)
    done = [json.loads(p.read_text()) for out, _ in jobs if (p := out / "run.json").is_file()]
    compute = sum(run["wall_time_s"] for run in done) / 60
    command = "python -m benchmarks.transfer " + " ".join(sys.argv[1:] if argv is None else argv)
    kinds = {"regime": args.regime, "ablation": args.ablation, "suite": args.suite, "selection": args.selection}
    kind = next((k for k, chosen in kinds.items() if chosen), "transfer")
    title = {"regime": "Regime: accuracy against images per class", "ablation": "Ablations",
             "suite": "Many classes, few images, another style", "selection": "Choosing a φ on held-out scripts",
             "transfer": "Transfer to data-scarce targets"}[kind]  # fmt: skip
    plot = []
    if args.regime:
        regime_plot(args.runs_dir, seeds, args.results.with_name(f"regime-{args.device}.png"))
        plot = [f"![regime](regime-{args.device}.png)  (Fashion-MNIST@N = N training images per class)"]
    text = "\n\n".join(
        [
            f"## {title}: {args.device.split(':')[0].upper()}, {args.steps:,} steps{', quick' if args.quick else ''} "
            "(`benchmarks/transfer.py`)",
            f"Command: `{command.strip()}`; machine: {args.machine}; {args.workers} workers; {args.steps} steps per "
            f"run; seeds {','.join(map(str, seeds))}; {len(done)} of {len(jobs)} runs finished, {compute:.0f} min of "
            f"run time in all (this invocation: {(time.time() - started) / 60:.1f} min wall; finished runs are "
            f"skipped). Per-run JSONs: `{os.path.relpath(args.runs_dir)}`. " + SETUP,
            *plot,
            *([ABLATION_SETUP] if args.ablation else []),
            *([SUITE_SETUP] if args.suite else []),
            *([SELECTION_SETUP] if args.selection else []),
            summary(args.runs_dir, cells, names, seeds),
            *(cell_table(args.runs_dir, cell, names, seeds) for cell in cells),
        ]
    )
    section = kind + ("-quick" if args.quick else "")
    section += ("" if args.device == "cpu" else "-" + args.device) + length
    write_section(section, text, args.results)
    if args.update_card:
        source = f"benchmarks/transfer.py, {args.device}, {args.steps} steps: accuracy % (seeds)"
        update_default_card(card_rows(args.runs_dir, cells, seeds, source))
    return report(text, failures)


def report(text: str, failures: list[str]) -> str:
    """Print a table's text; exit with the failed runs' messages if any run failed."""
    print(text)
    if failures:
        sys.exit("failed runs (the table holds the others):\n" + "\n".join(failures))
    return text


if __name__ == "__main__":
    main()
