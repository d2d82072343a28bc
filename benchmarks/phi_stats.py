"""How much each φ depends on its input: on the feature maps a trained network gives for real test images, the
spread of φ's noise mean a (an input-independent φ has none) and of its per-channel scale s.

    python -m benchmarks.phi_stats                        # the shipped φ, the authors', benchmarks/phis/*
    python -m benchmarks.phi_stats --phi NAME=PATH ...    # the shipped φ and these (folder, .pth, Hub id)
    python -m benchmarks.phi_stats --run FOLDER           # on another trained network

Every φ sees the same feature maps: those of a network `train/target.py` trained (its output folder: run.json and
the weights) for its own test images. The default is resnet20 trained without φ on Fashion-MNIST 5-9 (100 per
class): the ablation cell's base run (`python -m benchmarks.transfer --ablation --quick --rows base` writes it).
A network trained with φ gives larger feature maps, and the same φ can look more input-dependent on them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file

from benchmarks.results import machine, write_section
from benchmarks.transfer import ABLATION_CELL, AUTHORS_PHI, RUNS, run_dir
from timm_metaperturb import inject_metaperturb, load_phi
from timm_metaperturb.phi import MetaPerturb, expected_softplus
from timm_metaperturb.training.data import Augmentation, normalise
from timm_metaperturb.training.target import TargetConfig, prepare_data

PHIS = Path(__file__).with_name("phis")
SPREADS = ("a_std", "z_mean", "z_cv", "s_std")  # per site, averaged over sites
NETWORK = run_dir(RUNS / "cpu", ABLATION_CELL, "base", 0)
WEIGHTS = ("model.safetensors", "network.safetensors")  # the name a run's weights have, and had


def site_inputs(run: Path, images: int) -> tuple[TargetConfig, list[torch.Tensor]]:
    """The run's configuration and the feature map at each of φ's sites for `images` of its test images (φ at
    strength 0 on the trained network)."""
    weights = next((run / name for name in WEIGHTS if (run / name).is_file()), None)
    if weights is None or not (run / "run.json").is_file():
        sys.exit(
            f"no trained network in {run}: pass --run a folder train/target.py wrote (run.json and "
            f"model.safetensors); the default one comes from `python -m benchmarks.transfer --ablation --quick "
            f"--rows base`"
        )
    cfg = TargetConfig(**json.loads((run / "run.json").read_text())["config"])
    _, test = prepare_data(cfg)
    model = timm.create_model(cfg.model, num_classes=len(test.class_names))
    model.load_state_dict(load_file(weights))
    phi = MetaPerturb()
    inject_metaperturb(model, phi, input_size=(3, cfg.image_size, cfg.image_size), strength=0.0)
    inputs: list[torch.Tensor] = []
    phi.register_forward_pre_hook(lambda _, args: inputs.append(args[0].detach()))
    with torch.no_grad():
        model.eval()(normalise(test.images[:images], Augmentation(cfg.crop_padding, cfg.hflip)))
    return cfg, inputs


@torch.no_grad()
def spread(phi: MetaPerturb, inputs: list[torch.Tensor]) -> dict[str, float]:
    """Means over sites of std(a), of E[z]'s mean and coefficient of variation and of s's std over channels (s from
    the batch's statistics, as in training); s's range over all sites."""
    per_site: dict[str, list[float]] = {key: [] for key in SPREADS}
    scales = []
    for h in inputs:
        a = phi.noise_logits(h)
        z = expected_softplus(a)
        s = phi.scale(*phi.channel_statistics(h, None), h.shape[-2])  # the batch's statistics, as in training
        for key, value in zip(SPREADS, (a.std(), z.mean(), z.std() / z.mean(), s.std()), strict=True):
            per_site[key].append(value.item())
        scales.append(s)
    s_all = torch.cat(scales)
    means = {k: statistics.mean(v) for k, v in per_site.items()}
    return means | {"s_min": s_all.min().item(), "s_max": s_all.max().item()}


def trained_with(cfg: TargetConfig) -> str:
    """How the network was trained, for the table's caption."""
    if cfg.method == "base":
        return "without φ"
    return f"with {cfg.method} (φ: {cfg.phi or 'shipped'})" if "metaperturb" in cfg.method else f"with {cfg.method}"


def default_phis() -> dict[str, str]:
    """The authors' φ (where the reference folder is) and every φ under benchmarks/phis."""
    phis = {"authors": str(AUTHORS_PHI)} if AUTHORS_PHI.is_file() else {}
    return phis | {p.name: str(p) for p in sorted(PHIS.iterdir()) if (p / "config.json").is_file()}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phi", action="append", default=[], metavar="NAME=PATH", help="default: see above")
    parser.add_argument("--run", type=Path, default=NETWORK, help="a trained network's folder (default: see above)")
    parser.add_argument("--images", type=int, default=256, help="test images whose feature maps φ sees")
    parser.add_argument("--section", default="phi-stats", help="the RESULTS.md section written")
    args = parser.parse_args(argv)
    others = dict(item.split("=", 1) for item in args.phi) if args.phi else default_phis()
    phis: dict[str, str | None] = {"shipped": None, **others}
    torch.manual_seed(0)
    cfg, inputs = site_inputs(args.run, args.images)
    lines = ["| φ | std of a | E[z]: mean | E[z]: std / mean | s: std over channels | s: range |",
             "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, path in phis.items():
        r = spread(load_phi(path), inputs)
        cells = [f"{r[k]:.3f}" for k in SPREADS] + [f"{r['s_min']:.2f}-{r['s_max']:.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    command = "python -m benchmarks.phi_stats " + " ".join(sys.argv[1:] if argv is None else argv)
    text = (
        f"## How input-dependent each φ is, on {cfg.dataset} (`benchmarks/phi_stats.py`)\n\nCommand: "
        f"`{command.strip()}`; machine: "
        f"{machine()}; {len(inputs)} sites of {cfg.model} trained {trained_with(cfg)} on {cfg.dataset} "
        f"(`{os.path.relpath(args.run)}`), {args.images} of its test images. a = φ's noise mean (z = softplus(a + "
        "eps)); a φ whose noise ignores its input has std of a = 0 and E[z] the same everywhere; s from the "
        "batch's statistics as in training (0.5 everywhere when its weights are 0). Means over sites.\n\n"
        + "\n".join(lines)
    )
    write_section(args.section, text)
    print(text)
    return text


if __name__ == "__main__":
    main()
