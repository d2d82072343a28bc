"""How the deterministic pass depends on what batch norm is re-estimated with: trained networks evaluated with
their trained statistics ("mean"), fully re-estimated ("mean-bn", the default), re-estimated means with the trained
variances, re-estimated variances with the trained means, and re-estimated with φ's noise sampled.

    python train/target.py --dataset fashion_mnist --classes 5-9 --max-per-class 100 --model conv4 --steps 800 \
        --eval-noise sample --final-passes 1 --no-plots --output outputs/fm-conv4
    python -m benchmarks.reestimation_variants outputs/fm-conv4 [more run folders]

A run folder must hold the trained (not finalized) network: train it with `--eval-noise sample`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

import timm_metaperturb as tm
from timm_metaperturb.injection import eval_noise_as
from timm_metaperturb.recalibration import recalibrate_batchnorm
from timm_metaperturb.training.data import Augmentation
from timm_metaperturb.training.evaluation import ReestimationBatches, predict_proba, restored_buffers
from timm_metaperturb.training.metrics import classification_metrics
from timm_metaperturb.training.target import TargetConfig, prepare_data

NORMS = nn.modules.batchnorm._BatchNorm


def accuracy_after(model, train, test, aug, keep: str | None = None, noise: str = "mean") -> float:
    """Accuracy of the deterministic pass after re-estimating batch norm with φ's noise `noise`, keeping the trained
    `keep` statistic ("running_mean" or "running_var") of every batch norm; the model is left as it was."""
    with restored_buffers(model):
        norms = [m for m in model.modules() if isinstance(m, NORMS)]
        trained = [getattr(m, keep).clone() for m in norms] if keep else []
        torch.manual_seed(0)
        with eval_noise_as(model, noise):
            recalibrate_batchnorm(model, ReestimationBatches(train, aug, "cpu"))
        for norm, value in zip(norms, trained, strict=False):
            getattr(norm, keep).copy_(value)
        with eval_noise_as(model, "mean"):
            return classification_metrics(predict_proba(model, test, aug), test.labels)["accuracy"]


def variants(folder: Path) -> dict[str, float]:
    run = json.loads((folder / "run.json").read_text())
    cfg = TargetConfig(**run["config"])
    if cfg.eval_noise != "sample":
        raise ValueError(f"{folder} holds a finalized network: train it with --eval-noise sample")
    train, test = prepare_data(cfg)
    model = tm.create_model(f"local-dir:{folder}", pretrained=True)
    aug = Augmentation(cfg.crop_padding, cfg.hflip)
    with eval_noise_as(model, "mean"):
        trained = classification_metrics(predict_proba(model, test, aug), test.labels)["accuracy"]
    return {
        "mean (trained statistics)": trained,
        "mean-bn (re-estimated)": accuracy_after(model, train, test, aug),
        "means re-estimated, trained variances": accuracy_after(model, train, test, aug, keep="running_var"),
        "variances re-estimated, trained means": accuracy_after(model, train, test, aug, keep="running_mean"),
        "re-estimated with the noise sampled": accuracy_after(model, train, test, aug, noise="sample"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="run folders of train/target.py --eval-noise sample")
    for folder in parser.parse_args(argv).folders:
        print(json.dumps({"run": str(folder), **{k: round(v, 2) for k, v in variants(folder).items()}}))


if __name__ == "__main__":
    main()
