"""The plots a researcher expects from a target run: convergence, a reliability diagram, and for MetaPerturb
the learned per-channel scales s of every block (the paper's Figure 7)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure


def plot_run(run: dict, output: Path) -> list[Path]:
    """Write convergence.png, reliability.png and (MetaPerturb) scales.png; return their paths."""
    paths = [plot_convergence(run, output / "convergence.png"), plot_reliability(run, output / "reliability.png")]
    if run.get("scales"):
        paths.append(plot_scales(run["scales"], output / "scales.png"))
    return paths


def plot_convergence(run: dict, path: Path) -> Path:
    steps = [h["step"] for h in run["history"]]
    fig = Figure(figsize=(10, 3.6))
    acc, loss = fig.subplots(1, 2)
    acc.plot(steps, [h["accuracy"] for h in run["history"]], marker="o")
    acc.set(xlabel="step", ylabel="test accuracy (%)", title="Test accuracy")
    loss.plot(steps, [h["train_loss"] for h in run["history"]], marker="o", label="training loss (batch)")
    loss.plot(steps, [h["nll"] for h in run["history"]], marker="o", label="test NLL")
    loss.set(xlabel="step", ylabel="nats", title="Loss")
    loss.legend()
    fig.suptitle(f"{run['config']['model']} on {run['config']['dataset']}: {', '.join(run['methods'])}")
    return _save(fig, path)


def plot_reliability(run: dict, path: Path) -> Path:
    bins = run["reliability"]
    n = len(bins["count"])
    centers = [(i + 0.5) / n for i in range(n)]
    used = [i for i in range(n) if bins["count"][i] > 0]
    fig = Figure(figsize=(4.2, 4.2))
    ax = fig.subplots()
    ax.bar(
        [centers[i] for i in used], [bins["accuracy"][i] for i in used], width=1 / n, edgecolor="k", label="accuracy"
    )
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    ax.set_title(f"Reliability (ECE {run['final']['ece']:.2f}%)")
    ax.legend(loc="upper left")
    return _save(fig, path)


def plot_scales(scales: dict[str, list[float]], path: Path) -> Path:
    fig = Figure(figsize=(max(4.0, 0.5 * len(scales) + 2), 3.6))
    ax = fig.subplots()
    for i, values in enumerate(scales.values()):
        ordered = sorted(values)
        offsets = [i + 0.8 * (j / max(1, len(ordered) - 1) - 0.5) for j in range(len(ordered))]
        ax.scatter(offsets, ordered, s=6)
    ax.set_xticks(range(len(scales)), list(scales), rotation=60, ha="right", fontsize=7)
    ax.set(ylabel="scale s (per channel)", ylim=(0, 1), title="MetaPerturb's learned scales per block")
    return _save(fig, path)


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
