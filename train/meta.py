"""Meta-train MetaPerturb's φ on an image-classification dataset (the reference recipe by default).

One process:
    python train/meta.py --dataset fashion_mnist --classes 0-4 --groups 2 --output outputs/meta
N CPU processes (gloo):
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        train/meta.py --cpu --dataset fashion_mnist --classes 0-4 --groups 2 --output outputs/meta
N GPUs:
    accelerate launch --multi_gpu --num_processes 4 train/meta.py --dataset fashion_mnist ...
Resume an interrupted run from a checkpoint (written every --checkpoint-every steps):
    python train/meta.py ... --resume-from outputs/meta/checkpoints/step_300

The output folder gets `phi/` (model.safetensors, config.json, README.md), loadable with
`timm_metaperturb.MetaPerturb.from_pretrained`, and `run.json` (settings, per-task metrics, wall time).
"""

from __future__ import annotations

import shlex
import sys

from accelerate import Accelerator

from timm_metaperturb.command_line import run_main
from timm_metaperturb.training.cli import config_parser
from timm_metaperturb.training.meta import MetaTrainConfig, meta_train

HELP = {
    "dataset": "fashion_mnist, digits, a local image folder, or a Hugging Face Hub dataset name",
    "dataset_split": "the dataset split to meta-train on",
    "val_split": "validate each task on this split of its classes instead of its own held-out half, e.g. test for "
    "the glyph sources (drawn in other fonts): φ learns to regularise for a style shift",
    "val_corruptions": "corrupt every validation image once with one of these corruption types or families (e.g. "
    "noise,blur; imagecorruptions, needs the robustness extra and 32 px images): φ learns to make networks robust "
    "to them",
    "classes": "class subset to meta-train on, e.g. 0-4 (hold the rest out for evaluation); default all",
    "groups": "number of class groups G; there are 2G tasks",
    "extra_sources": "more source datasets, each DATASET:CLASSES:GROUPS (CLASSES empty for all), e.g. "
    "fashion_mnist:0-4:2: each split into tasks of its own, so that φ is meta-trained on several domains",
    "task_split": "class_wise (the paper's) or instance_wise (the homogeneous ablation)",
    "train_per_class": "keep at most N training images per class in every task (the data-scarce regime φ is for); "
    "default all",
    "model": "source network: any timm CNN name, e.g. resnet20, conv4, resnet18",
    "spatial_norm": "s_norm of φ (default: the image size)",
    "phi_scale_lr": "learning rate of φ's scale function alone (default: --phi-lr for all of φ)",
    "init_phi": "start from this φ (a folder, .safetensors or .pth file, packaged name or Hub id) instead of the "
    "paper's initialisation",
    "checkpoint_every": "save a resumable checkpoint every N steps (0: never)",
    "report_to": "an Accelerate tracker (tensorboard, wandb, ...) to log to",
    "cpu": "run on the CPU even where a GPU is available",
}


def parse_args(argv: list[str] | None = None) -> MetaTrainConfig:
    return MetaTrainConfig(**vars(config_parser(MetaTrainConfig, __doc__, HELP).parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    accelerator = Accelerator(cpu=cfg.cpu, log_with=cfg.report_to, project_dir=cfg.output)
    command = "train/meta.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    meta_train(cfg, accelerator, command=f"{command}  # on {accelerator.num_processes} process(es)")


if __name__ == "__main__":
    run_main(main)
