"""Train one network on a target dataset with MetaPerturb or a baseline regularizer, and evaluate it
(accuracy, NLL, ECE), writing run.json, plots and the network in timm's format (config.json, model.safetensors,
MetaPerturb's files, a model card; reload it with timm_metaperturb.create_model("local-dir:OUTPUT", pretrained=True))
to --output.

With no arguments it runs the embedded default job: ResNet-20 with MetaPerturb (the shipped φ) on
scikit-learn's digits at 32x32, 20 training images per class and the other 1,597 images as the test set, 400 steps:
    python train/target.py
Options without --dataset change that job (here: the same job with DropBlock, written to outputs/digits-dropblock):
    python train/target.py --method dropblock
With --dataset, the run starts from the reference recipe (10,000 steps) instead, e.g. Fashion-MNIST classes 5-9 with
100 images per class and DropBlock:
    python train/target.py --dataset fashion_mnist --classes 5-9 --max-per-class 100 --method dropblock
Your own photos (a folder with one sub-folder per class), from a pretrained backbone with timm's transforms, on
every GPU (or several CPU processes):
    accelerate launch train/target.py --dataset photos/ --val-fraction 0.2 --model resnet50 --pretrained \
        --image-size 224 --batch-size 64 --steps 2000 --device cuda
Methods: base, metaperturb, information_dropout, dropblock, manifold_mixup, or a combination joined by '+';
--init-from FOLDER fine-tunes from an earlier run's output folder, a hf-hub:REPO of one, or a checkpoint file (the
classifier is re-initialised when the classes differ). A long run that may be cut off: --checkpoint-every 500, and
after the cut the same command with --resume.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from timm_metaperturb.command_line import run_main
from timm_metaperturb.training.cli import config_parser
from timm_metaperturb.training.target import TargetConfig, train_target

# the embedded default job (no --dataset): small enough for 5 minutes on 2 CPU cores
DEFAULT_JOB = ["--dataset", "digits", "--max-per-class", "20", "--test-rest", "--no-hflip", "--steps", "400",
               "--eval-every", "200"]  # fmt: skip

HELP = {
    "dataset": "fashion_mnist, digits, a local image folder, or a Hugging Face Hub dataset name",
    "val_fraction": "hold out this fraction of each class of the training split as the test set",
    "test_rest": "use the training-split images not picked for training (see --max-per-class) as the test set",
    "max_per_class": "keep this many training images per class (data-scarce settings)",
    "classes": "class subset, e.g. 5-9",
    "model": "any timm CNN name, e.g. resnet20, conv4, wrn28_2, resnet50, or hf-hub:REPO / local-dir:FOLDER",
    "pretrained": "start from the model's pretrained timm weights (from the Hugging Face Hub for a timm name, from "
    "the folder for hf-hub: / local-dir:); the classifier is new for the dataset's classes",
    "augment": "reference (pad-and-crop and flip, the paper's) or timm (timm's transforms for the model: random-"
    "resized crop, flip, its mean and std); default: timm with --pretrained, else reference",
    "auto_augment": "with --augment timm: timm's auto-augment policy, e.g. rand-m9-mstd0.5 or trivialaugment",
    "loader": "memory (decode every image once and hold them), stream (decode each image in loader workers), or auto "
    "(stream with --augment timm or when the images would take over 2 GiB)",
    "workers": "loader worker processes per training process when streaming (default: the CPU cores shared out "
    "among the training processes, at most 8 each)",
    "skip_unreadable": "leave unreadable image files out (with a warning naming each) instead of stopping",
    "sync_stats": "with several processes: batch norm's and φ's batch statistics over the global batch (like "
    "SyncBatchNorm) and φ's noise as one process draws it, so N processes train the network one process would; "
    "default: each process's own statistics and noise",
    "grad_accum": "split each step's batch over this many forwards (gradient accumulation); --batch-size stays the "
    "images per optimizer step",
    "mixed_precision": "no, bf16 or fp16 (autocast; default: what accelerate launch was given)",
    "report_to": "an Accelerate tracker to log to: tensorboard, wandb, ...",
    "method": "base, metaperturb, information_dropout, dropblock, manifold_mixup, or a combination a+b",
    "phi": "φ for metaperturb: a folder, .safetensors file, Hub repo id, or the name of another φ the package "
    "ships (timm_metaperturb.packaged_phis()) (default: the shipped φ)",
    "init_from": "fine-tune from this network: an earlier run's output folder, hf-hub:REPO, or a checkpoint file",
    "milestones": "fractions of the steps where the learning rate is multiplied by --gamma",
    "anneal": "MetaPerturb's strength k rises linearly to 1 over this fraction of the steps",
    "eval_passes": "Monte-Carlo passes of stochastic methods at intermediate evaluations",
    "final_passes": "Monte-Carlo passes of stochastic methods at the final evaluation",
    "eval_noise": "MetaPerturb at eval: mean (default: one deterministic pass, batch norm re-estimated in that "
    "mode on the training images first) or sample (Monte-Carlo over --eval-passes / --final-passes passes)",
    "device": "auto (cuda where there is a GPU, else cpu), cpu, cuda or cuda:N",
    "phi_components": "φ's factors that act: noise,scale (default); noise (the scale s fixed to 1) or scale (the "
    "noise z fixed to 1) for ablations",
    "final_modes": "also report these final evaluations, e.g. 1,10,100,mean,mean-bn (N sampled passes, expected "
    "noise, expected noise after re-estimating batch norm; baselines: final, final-bn)",
    "noise_augment": "add Gaussian pixel noise to each training image, its std drawn from [0, N] (pixels in [0, 1]; "
    "reference augmentation only): a robustness baseline",
    "augmix": "AugMix on each training image at this severity (the paper's 3; its own operations, none of the test "
    "corruptions; reference augmentation only): a robustness baseline",
    "corruptions": "also evaluate on N test images under each of imagecorruptions' 15 types at 5 severities, in the "
    "default evaluation (made once and cached; needs the robustness extra)",
    "adversarial": "also evaluate on N test images under L∞ PGD (torchattacks; 20 steps, eps 1, 2, 4, 8 / 255) in the "
    "default evaluation",
    "checkpoint_every": "save the training state to OUTPUT/checkpoint.pt every N steps (0: never); removed when the "
    "run completes",
    "resume": "continue from OUTPUT/checkpoint.pt where there is one (the same network as an uninterrupted run)",
    "output": "the folder for run.json, plots and the network (default: outputs/<dataset>-<method>)",
}


def job_arguments(argv: list[str]) -> list[str]:
    """The arguments a run parses: argv alone where it names a dataset, else the default job with argv's options
    on top (argparse keeps an option's last value), so that `--method base` or `--device cuda` changes the default
    job instead of starting a 10,000-step run on a dataset that needs a test split chosen. The parser decides
    whether argv names a dataset, so every spelling it accepts (`--dataset=x`, the abbreviation `--data x`) counts."""
    parser = target_parser()
    parser.set_defaults(dataset=None)
    return argv if parser.parse_args(argv).dataset is not None else [*DEFAULT_JOB, *argv]


def target_parser() -> argparse.ArgumentParser:
    return config_parser(TargetConfig, __doc__, HELP)


def parse_args(argv: list[str]) -> TargetConfig:
    return TargetConfig(**vars(target_parser().parse_args(argv)))


def results_table(runs: list[dict]) -> str:
    """The final metrics of runs as a Markdown table."""
    lines = [
        "| method | model | dataset | train / test | accuracy (%) | NLL | ECE (%) | passes | minutes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        c, f, d = run["config"], run["final"], run["data"]
        lines.append(
            f"| {'+'.join(run['methods'])} | {c['model']} | {c['dataset']} | {d['train']} / {d['test']} | "
            f"{f['accuracy']:.2f} | {f['nll']:.3f} | {f['ece']:.2f} | {f['passes']} | {run['wall_time_s'] / 60:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    args = job_arguments(sys.argv[1:] if argv is None else argv)
    cfg = parse_args(args)
    run = train_target(cfg, command="python train/target.py " + shlex.join(args))
    if run is None:  # not the main process of an `accelerate launch`: the main one reports
        return None
    print(results_table([run]))
    print(f"\nrun.json, plots and the network (timm's format) in {cfg.output_dir()}")
    return run


if __name__ == "__main__":
    run_main(main)
