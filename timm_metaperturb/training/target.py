"""Training one network on a target dataset, with MetaPerturb or a baseline regularizer, and evaluating it.

The reference recipe: Adam (lr 1e-3, weight decay 5e-4), batch 128, 10,000 steps, the learning rate x0.3 at
40%, 70% and 90% of the steps, MetaPerturb's strength k = min(1, step / (0.4 steps)), φ frozen. Evaluation:
accuracy, NLL and ECE on the test set (`evaluation.py`). `train/target.py` is its command line.

One process or many (`accelerate launch`): the batch size is the global batch of one optimizer step, split over
the processes and, with `grad_accum`, over forwards; each process's loss is weighted by its share of the batch, so
the gradient is the global batch's mean however it is split. Batch norm's and φ's batch statistics are each
process's own unless `sync_stats` (`distributed.py`). With `checkpoint_every`, a run killed at any point and
started again with `resume` (on any number of processes) continues from its last checkpoint; on one process it
ends with the same network as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from tqdm.auto import tqdm

from ..distributed import synchronise_batchnorm, synchronised
from ..injection import ATTRIBUTE, annealed_strength, finalize_for_inference, get_injection, set_eval_noise
from ..model_card import network_model_card
from ..pretrained import network_weights_file, save_pretrained
from ..regularizers import REGULARIZERS, add_regularizer, get_regularizer
from ..sites import SiteModule
from ..state_dicts import mismatch_report
from .adversarial import adversarial_accuracy
from .checkpoints import STATE_FILE, check_resumable, load_checkpoint_file, save_checkpoint_file
from .cpu_memory import keep_freed_memory
from .data import Augmentation, EpochSampler, ImageTensors, crop_flip, normalise, seed_for, share_of_rank
from .evaluation import (
    ReestimationBatches,
    evaluate_corrupted,
    evaluate_modes,
    predict_proba,
    predict_recalibrated,
    training_loss_with_and_without_noise,
    unfit_warning,
)
from .metrics import classification_metrics, reliability_bins
from .provenance import run_environment
from .streaming import (
    TRANSFORMS,
    ReferenceTransform,
    TrainKeys,
    loader,
    next_global,
    timm_data_config,
    timm_transforms,
)
from .target_data import LOADERS, MEMORY_BUDGET, TargetData, select_target_data

METHODS = ("base", *REGULARIZERS)


@dataclass
class TargetConfig:
    """Every knob of a target run; the defaults are the reference recipe."""

    dataset: str = "digits"
    train_split: str = "train"
    test_split: str = "test"
    val_fraction: float | None = None
    test_rest: bool = False
    max_per_class: int | None = None
    classes: str | None = None
    model: str = "resnet20"
    pretrained: bool = False
    method: str = "metaperturb"
    phi: str | None = None
    init_from: str | None = None
    image_size: int = 32
    steps: int = 10_000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 5e-4
    milestones: str = "0.4,0.7,0.9"
    gamma: float = 0.3
    anneal: float = 0.4
    eval_every: int = 500
    eval_passes: int = 5
    final_passes: int = 100
    eval_noise: str = "mean"  # one deterministic pass after re-estimating batch norm: as accurate as MC-10
    final_modes: str = ""
    corruptions: int = 0  # test images also evaluated under every corruption (0: none)
    adversarial: int = 0  # test images also evaluated under L∞ PGD attacks (0: none)
    crop_padding: int = 4
    hflip: bool = True
    noise_augment: float = 0.0  # largest std of Gaussian pixel noise added to training images (0: none)
    augmix: int = 0  # AugMix's severity on training images (0: none)
    augment: str | None = None  # reference or timm; default: timm with --pretrained, else reference
    auto_augment: str | None = None
    loader: str = "auto"
    workers: int | None = None
    skip_unreadable: bool = False
    sync_stats: bool = False
    grad_accum: int = 1
    mixed_precision: str | None = None
    report_to: str | None = None
    placement: str = "pre_activation"
    phi_components: str = "noise,scale"
    dropblock_prob: float = 0.1
    dropblock_size: int = 3
    info_beta: float = 0.1
    info_alpha_max: float = 0.7
    mixup_alpha: float = 2.0
    seed: int = 0
    output: str | None = None  # default: outputs/<dataset>-<method>, see output_dir()
    plots: bool = True
    progress: bool = True
    device: str = "auto"  # cuda where there is a GPU, else cpu
    channels_last: bool = False
    checkpoint_every: int = 0
    resume: bool = False

    # the settings a resumed run may change: where it writes, what it shows, and the final evaluations
    RESUME_FREE = (
        "output",
        "progress",
        "plots",
        "checkpoint_every",
        "resume",
        "final_passes",
        "final_modes",
        "corruptions",
        "adversarial",
        "loader",
        "workers",
        "report_to",
    )

    def methods(self) -> list[str]:
        methods = [m.strip() for m in self.method.replace("+", ",").split(",") if m.strip()]
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise ValueError(f"unknown method {unknown or self.method!r}; choose from {', '.join(METHODS)}")
        if "base" in methods and len(methods) > 1:
            raise ValueError("'base' means no regularizer: do not combine it with other methods")
        return [m for m in methods if m != "base"]

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def augmentation(self) -> str:
        kind = self.augment or ("timm" if self.pretrained else "reference")
        if kind not in TRANSFORMS:
            raise ValueError(f"--augment {kind!r}: choose from {', '.join(TRANSFORMS)}")
        if (self.noise_augment or self.augmix) and kind != "reference":
            raise ValueError("--noise-augment and --augmix extend the reference augmentation: pass --augment "
                             "reference (with --augment timm, --auto-augment augmix-m3-w3 is timm's own)")  # fmt: skip
        return kind

    def output_dir(self) -> Path:
        """Where the run writes: --output, else outputs/<dataset>-<method> (the dataset's last path part, so a Hub
        name or a local folder gives a plain folder name)."""
        return Path(self.output or f"outputs/{Path(self.dataset.rstrip('/')).name}-{self.method}")

    def final_eval_modes(self) -> list[str]:
        modes = [m.strip() for m in self.final_modes.split(",") if m.strip()]
        wrong = [m for m in modes if m not in ("mean", "mean-bn") and not (m.isdigit() and int(m) > 0)]
        if wrong:
            raise ValueError(f"--final-modes {wrong}: use pass counts (e.g. 1,10,100), 'mean' and/or 'mean-bn'")
        return modes


# -- model -----------------------------------------------------------------------------------------------------


def load_initial_weights(model: nn.Module, source: str) -> list[str]:
    """Fine-tuning: load a network checkpoint (a folder save_pretrained wrote, as a path, `local-dir:` or `hf-hub:`;
    a safetensors file; a torch state dict of tensors); a classifier of another shape (other classes) is left
    freshly initialised. Any other mismatch is an error. Returns the keys left out."""
    path = network_weights_file(source)
    if path.endswith(".safetensors"):
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = model.state_dict()
    head = (model.pretrained_cfg or {}).get("classifier", "fc") if hasattr(model, "pretrained_cfg") else "fc"
    skipped = [k for k in own if k.startswith(head + ".") and k in state and state[k].shape != own[k].shape]
    kept = {k: v for k, v in state.items() if k not in skipped}
    if report := mismatch_report({k: v for k, v in own.items() if k not in skipped}, kept):
        raise ValueError(f"--init-from {source} does not fit {type(model).__name__} ({report})")
    model.load_state_dict(kept, strict=False)
    return skipped


def build_model(cfg: TargetConfig, num_classes: int) -> tuple[nn.Module, dict[str, nn.Module]]:
    """The network with the chosen methods attached, on cfg.device in cfg's memory layout; returns it and
    {method: attached module}. With `pretrained`, timm's weights for the architecture (a `hf-hub:` or `local-dir:`
    model name loads that folder's), the classifier new for `num_classes`."""
    methods = cfg.methods()
    if not cfg.model.startswith(("hf-hub:", "local-dir:")) and not timm.is_model(cfg.model):
        raise ValueError(f"unknown model '{cfg.model}': pass a timm model name (see timm.list_models())")
    try:
        model = timm.create_model(cfg.model, pretrained=cfg.pretrained, num_classes=num_classes)
    except Exception as e:  # the Hub's errors for a missing connection, repository or file
        if not cfg.pretrained:
            raise
        raise ValueError(
            f"--pretrained could not load the weights of {cfg.model} ({type(e).__name__}: {str(e).splitlines()[0]}): "
            "connect to the Hugging Face Hub, or pass --model local-dir:FOLDER (config.json and model.safetensors)"
        ) from e
    if cfg.init_from:
        load_initial_weights(model, cfg.init_from)
    check_image_size(model, cfg)
    if cfg.sync_stats:
        synchronise_batchnorm(model)
    size = (3, cfg.image_size, cfg.image_size)
    attached: dict[str, SiteModule] = {}
    for method in methods:
        options = {arg: getattr(cfg, field) for arg, field in REGULARIZERS[method].CONFIG_FIELDS.items()}
        add_regularizer(model, method, placement=cfg.placement, input_size=size, total_steps=cfg.steps, **options)
        attached[method] = get_regularizer(model, method)
    if ATTRIBUTE in attached:
        injection = attached[ATTRIBUTE]
        injection.mode = replace(injection.mode, components=cfg.phi_components.split(","))
        set_eval_noise(model, cfg.eval_noise)
    model.to(cfg.torch_device(), memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    return model, attached


@torch.no_grad()
def check_image_size(model: nn.Module, cfg: TargetConfig) -> None:
    """Fail before training when the network cannot take images of --image-size."""
    try:
        model.eval()(torch.zeros(1, 3, cfg.image_size, cfg.image_size))
    except RuntimeError as e:
        raise ValueError(
            f"{cfg.model} cannot take {cfg.image_size}x{cfg.image_size} images ({str(e).splitlines()[0]}): pass a "
            "larger --image-size"
        ) from e


def pixel_statistics(model: nn.Module, cfg: TargetConfig) -> tuple[float | tuple, float | tuple]:
    """The mean and std inputs are normalised with: the pretrained weights' (their pretrained config's), else 0.5."""
    if not cfg.pretrained:
        return 0.5, 0.5
    pretrained = model.pretrained_cfg
    return tuple(pretrained.get("mean", (0.5,) * 3)), tuple(pretrained.get("std", (0.5,) * 3))


def data_config(cfg: TargetConfig, aug: Augmentation, model: nn.Module) -> dict:
    """The preprocessing the network was trained with, for its pretrained_cfg: timm's resolved config with timm's
    transforms; otherwise every image squashed to the square image size (bilinear, antialiased), scaled to [0, 1]
    and normalised with `aug`'s mean and std."""
    if cfg.augmentation() == "timm":
        return timm_data_config(model, cfg.image_size)
    mean, std = (v if isinstance(v, tuple) else (v,) * 3 for v in (aug.mean, aug.std))
    return {"input_size": (3, cfg.image_size, cfg.image_size), "interpolation": "bilinear", "crop_pct": 1.0,
            "crop_mode": "squash", "mean": mean, "std": std}  # fmt: skip


# -- data ------------------------------------------------------------------------------------------------------


def prepare_data(
    cfg: TargetConfig,
    model: nn.Module | None = None,
    aug: Augmentation | None = None,
    selected: TargetData | None = None,
    processes: int = 1,
) -> tuple:
    """The training and test sets, in memory or streamed (`cfg.loader`; `auto` streams with timm's transforms or
    when the decoded images would pass MEMORY_BUDGET). timm's transforms follow `model`'s pretrained config; the
    CPU cores are shared out as loader workers among the `processes` that train."""
    if cfg.loader not in LOADERS:
        raise ValueError(f"--loader {cfg.loader!r}: choose from {', '.join(LOADERS)}")
    kind = cfg.augmentation()
    selected = selected or select_target_data(cfg)
    streamed = cfg.loader == "stream" or (
        cfg.loader == "auto" and (kind == "timm" or selected.decoded_bytes(cfg.image_size) > MEMORY_BUDGET)
    )
    if kind == "timm" and not streamed:
        raise ValueError("--augment timm decodes each image in a loader worker: use --loader stream (or auto)")
    if not streamed:
        return selected.materialise(cfg.image_size, False)
    aug = aug or Augmentation(cfg.crop_padding, cfg.hflip, noise=cfg.noise_augment, augmix=cfg.augmix)
    if kind == "timm":
        if model is None:
            model = timm.create_model(cfg.model, pretrained=False, num_classes=len(selected.class_names))
        transforms = timm_transforms(model, cfg.image_size, cfg.hflip, cfg.auto_augment)
    else:
        transforms = (ReferenceTransform(cfg.image_size, aug),) * 2
    workers = cfg.workers if cfg.workers is not None else min(8, max(1, (os.cpu_count() or 1) // processes))
    return selected.materialise(cfg.image_size, True, transforms, workers, cfg.skip_unreadable)


class TrainBatches:
    """This process's share of each step's training batch, normalised on `device`, with its labels. The run's
    sampler (saved in checkpoints) draws each global batch and, for the reference transform, its crops and flips;
    in memory they are applied here, streamed they are replayed by a loader whose workers decode and transform."""

    def __init__(self, train, aug: Augmentation, sampler: EpochSampler, cfg: TargetConfig, start: int, device,
                 rank: int = 0, world_size: int = 1) -> None:  # fmt: skip
        self.train, self.aug, self.sampler, self.device = train, aug, sampler, device
        self.kind, self.seed, self.rank, self.world_size = cfg.augmentation(), cfg.seed, rank, world_size
        self.step = start
        self.stream = None
        if not isinstance(train, ImageTensors):
            keys = TrainKeys(sampler, self.kind, aug, cfg.seed, start, cfg.steps, rank, world_size)
            self.stream = iter(loader(train, keys, train.workers))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx, draws = next_global(self.sampler, self.kind, self.aug, self.seed, self.step)
        self.step += 1
        part = share_of_rank(len(idx), self.rank, self.world_size)
        if self.stream is None:
            images = crop_flip(self.train.images[idx[part]], draws[part], self.aug)
            x = normalise(images.to(self.device), self.aug, draws[part])
            return x, self.train.labels[idx[part]].to(self.device)
        x, y, positions = next(self.stream)
        if not set(positions.tolist()) <= set(idx[part].tolist()):
            raise RuntimeError("the loader's batch is not the sampler's: the run's batches went out of step")
        return x.to(self.device), y.to(self.device)


# -- training ----------------------------------------------------------------------------------------------------


CHECKPOINT_DIR = "checkpoint"  # in the output folder; removed once the run is complete


def training_state(
    model: nn.Module, optimizer: Optimizer, scheduler: LRScheduler, sampler: EpochSampler, device: str
) -> dict:
    """Everything a training step changes: weights and buffers (φ's statistics too), the optimizer and schedule,
    the batch order, and the generators that draw noise, masks and mixing."""
    cuda_rng = {"cuda_rng": torch.cuda.get_rng_state(device)} if device.startswith("cuda") else {}
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "sampler": sampler.state_dict(), "rng": torch.get_rng_state(), **cuda_rng}  # fmt: skip


def restore_training_state(
    state: dict, model: nn.Module, optimizer: Optimizer, scheduler: LRScheduler, sampler: EpochSampler, device: str
) -> None:
    """The inverse of `training_state`."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    sampler.load_state_dict(state["sampler"])
    torch.set_rng_state(state["rng"])
    if "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def train_target(cfg: TargetConfig, command: str = "") -> dict | None:
    """Train and evaluate one run, on this process or on every process `accelerate launch` started; the main
    process writes run.json, the network in timm's format (`save_pretrained`: config.json, model.safetensors,
    MetaPerturb's files, a model card) and plots to `cfg.output_dir()` and returns the run; the others return None."""
    from accelerate import Accelerator

    started = time.time()
    if cfg.torch_device().type == "cpu":
        keep_freed_memory()
    methods, final_modes = cfg.methods(), cfg.final_eval_modes()
    if cfg.grad_accum < 1 or cfg.batch_size % cfg.grad_accum:
        raise ValueError(f"--grad-accum {cfg.grad_accum} must be at least 1 and divide --batch-size {cfg.batch_size}")
    output = cfg.output_dir()
    accelerator = Accelerator(cpu=cfg.torch_device().type == "cpu", mixed_precision=cfg.mixed_precision,
                              log_with=cfg.report_to, project_dir=output)  # fmt: skip
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    device = cfg.torch_device() if world == 1 else accelerator.device
    selected = select_target_data(cfg)
    torch.manual_seed(seed_for(cfg.seed, "model"))
    model, attached = build_model(replace(cfg, device=str(device)), len(selected.class_names))
    aug = Augmentation(cfg.crop_padding, cfg.hflip, *pixel_statistics(model, cfg), cfg.noise_augment, cfg.augmix)
    train, test = prepare_data(cfg, model, aug, selected, world)
    synchronised_noise = world > 1 and cfg.sync_stats and "metaperturb" in attached
    if world > 1 and not cfg.sync_stats:  # each process its own noise (and masks, and mixing), like dropout
        torch.manual_seed(seed_for(cfg.seed, "process", rank))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    milestones = [round(float(f) * cfg.steps) for f in cfg.milestones.split(",") if f.strip()]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=cfg.gamma)
    sampler = EpochSampler(len(train), min(cfg.batch_size, len(train)), seed_for(cfg.seed, "batches"))
    if sampler.batch_size < world * cfg.grad_accum:
        raise ValueError(f"a batch of {sampler.batch_size} cannot be split over {world} processes x --grad-accum "
                         f"{cfg.grad_accum}: use a larger --batch-size")  # fmt: skip
    stochastic, recalibrated = phi_evaluation(cfg, attached)
    wrapped, optimizer = accelerator.prepare(model, optimizer) if world > 1 else (model, optimizer)
    if world == 1 and cfg.mixed_precision not in (None, "no"):
        optimizer = accelerator.prepare_optimizer(optimizer)

    def test_proba(passes: int) -> torch.Tensor:
        """MetaPerturb's evaluation: Monte-Carlo over `passes`, or one deterministic pass after re-estimating
        batch norm in that mode; other methods: one pass."""
        if recalibrated:
            return predict_recalibrated(model, test, aug, train)
        return predict_proba(model, test, aug, passes if stochastic else 1)

    history, strengths, start, elapsed = [], [], 0, 0.0
    checkpoint = output / CHECKPOINT_DIR
    if main:
        output.mkdir(parents=True, exist_ok=True)
    if cfg.resume and (checkpoint / STATE_FILE).is_file():
        state = load_checkpoint_file(checkpoint / STATE_FILE)
        check_resumable(state["config"], cfg, checkpoint)
        restore_training_state(state, model, optimizer, scheduler, sampler, str(device))
        if world > 1 and not cfg.sync_stats:
            torch.manual_seed(seed_for(cfg.seed, "process", rank, state["step"]))
        history, strengths, start, elapsed = state["history"], state["strengths"], state["step"], state["elapsed"]
        accelerator.print(f"resuming from {checkpoint} at step {start} of {cfg.steps}")
    elif cfg.resume:
        accelerator.print(f"no checkpoint in {output}: starting at step 0")
    if cfg.report_to:
        accelerator.init_trackers("target", config={k: v for k, v in asdict(cfg).items() if v is not None})
    batches = TrainBatches(train, aug, sampler, cfg, start, device, rank, world)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not (cfg.progress and main),
               desc=f"{cfg.method} on {cfg.dataset}")  # fmt: skip
    tick, seen = time.time(), 0
    for step in bar:  # the methods' schedules follow the optimizer's steps (`schedule.py`)
        strengths.append(annealed_strength(step, cfg.steps, cfg.anneal))
        model.train()
        x_all, y_all = batches.next()
        optimizer.zero_grad(set_to_none=True)
        pieces = list(zip(x_all.tensor_split(cfg.grad_accum), y_all.tensor_split(cfg.grad_accum), strict=True))
        first = share_of_rank(sampler.batch_size, rank, world).start
        for i, (x, y) in enumerate(pieces):
            if synchronised_noise:  # eps as one process draws it for these images of the global batch
                injection = attached[ATTRIBUTE]
                injection.mode = replace(injection.mode, first_image=first + sum(len(p[1]) for p in pieces[:i]))
            last = i == len(pieces) - 1
            with nullcontext() if last or world == 1 else accelerator.no_sync(wrapped), synchronised(cfg.sync_stats):
                with accelerator.autocast():
                    for owner in attached.values():
                        x = owner.transform_batch(x)
                    logits = wrapped(x)
                    task_losses = [loss for owner in attached.values()
                                   if (loss := owner.task_loss(logits, y)) is not None]  # fmt: skip
                    loss = task_losses[0] if task_losses else F.cross_entropy(logits, y)
                    for owner in attached.values():
                        if (extra := owner.extra_loss()) is not None:
                            loss = loss + extra
                share = len(y) * world / sampler.batch_size  # this forward's part of the global mean
                accelerator.backward(loss if share == 1 else loss * share)
        optimizer.step()
        scheduler.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the training loss became {loss.item()} at step {step + 1}: lower --lr")
        seen += len(y_all) * world
        if main and cfg.progress and (step + 1) % 10 == 0:
            rate, tick, seen = seen / (time.time() - tick), time.time(), 0
            bar.set_postfix(loss=f"{loss.item():.3f}", images_per_s=f"{rate:.0f}")
        if main and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            with torch.random.fork_rng(devices=[]) if world > 1 else nullcontext():  # the processes stay in step
                probs = test_proba(cfg.eval_passes)
            history.append({"step": step + 1, "train_loss": loss.item(), **classification_metrics(probs, test.labels)})
            tick, seen = time.time(), 0  # the rate leaves the evaluation out
            bar.write(f"step {step + 1}: test accuracy {history[-1]['accuracy']:.2f}%")
            if cfg.report_to:
                accelerator.log({k: v for k, v in history[-1].items() if k != "step"}, step=step + 1)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            if main:
                save_checkpoint_file(checkpoint, STATE_FILE, {
                    **training_state(model, optimizer, scheduler, sampler, str(device)), "config": asdict(cfg),
                    "step": step + 1, "history": history, "strengths": strengths,
                    "elapsed": elapsed + time.time() - started,
                })  # fmt: skip
            accelerator.wait_for_everyone()
    accelerator.wait_for_everyone()
    if synchronised_noise:
        attached[ATTRIBUTE].mode = replace(attached[ATTRIBUTE].mode, first_image=0)
    run = None
    if main:
        run = _finish(cfg, command, model, attached, train, test, aug, history, strengths, loss,
                      final_modes, methods, elapsed - started, world)  # fmt: skip
        if cfg.report_to:
            accelerator.log({f"final_{k}": v for k, v in run["final"].items() if k != "step"}, step=cfg.steps)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # ends the trackers and the process group
    return run


def phi_evaluation(cfg: TargetConfig, attached: dict) -> tuple[bool, bool]:
    """(stochastic, recalibrated): whether MetaPerturb is evaluated by sampled passes, or by one deterministic pass
    after batch norm's re-estimation."""
    phi = "metaperturb" in attached
    return phi and cfg.eval_noise == "sample", phi and cfg.eval_noise == "mean"


def _finish(cfg, command, model, attached, train, test, aug, history, strengths, loss, final_modes,
            methods, clock_offset, world) -> dict:  # fmt: skip
    """The final evaluations, the finalized network, run.json, the network's folder and the plots; the wall time
    is `clock_offset` + time.time() at the end."""
    output = cfg.output_dir()
    stochastic, recalibrated = phi_evaluation(cfg, attached)
    passes = cfg.final_passes if stochastic else 1
    probs = None if recalibrated else predict_proba(model, test, aug, passes)
    run = {"config": asdict(cfg), "command": command, "methods": methods or ["base"], "world_size": world,
           **run_environment(),
           "data": {"train": len(train), "test": len(test), "classes": train.class_names}}  # fmt: skip
    if final_modes:  # on the trained network, before it is finalized
        run["evaluations"] = evaluate_modes(model, test, aug, final_modes, train)
    if cfg.corruptions:
        run["corruptions"] = evaluate_corrupted(model, test, aug, train, cfg.corruptions)
    if cfg.adversarial:
        run["adversarial"] = adversarial_accuracy(model, test, aug, train, cfg.adversarial, seed=cfg.seed)
    if "metaperturb" in attached:
        run["scales"] = {name: s.tolist() for name, s in get_injection(model).scales().items()}
        run["train_loss_phi"] = training_loss_with_and_without_noise(model, train, aug, cfg.batch_size)
        warning = unfit_warning(run["train_loss_phi"])
        if warning:
            run["warnings"] = [warning]
            warnings.warn(warning, stacklevel=3)
    if recalibrated:  # the network kept is the one evaluated: deterministic, batch norm re-estimated for good
        finalize_for_inference(model, ReestimationBatches(train, aug, next(model.parameters()).device))
        probs = predict_proba(model, test, aug)
    final = {"step": cfg.steps, "train_loss": loss.item(), "passes": passes,
             **classification_metrics(probs, test.labels)}  # fmt: skip
    history.append(final)
    run.update({
        "history": history, "final": final,
        "reliability": {k: v.tolist() for k, v in reliability_bins(probs, test.labels).items()},
        "strength_at": {f"{p:.0%}": strengths[min(len(strengths) - 1, round(p * cfg.steps))] for p in (0, 0.2, 0.4, 1)},
        "wall_time_s": clock_offset + time.time(),
    })  # fmt: skip
    card = network_model_card(model, f"local-dir:{output}", run)
    save_pretrained(model, output, data_config=data_config(cfg, aug, model), card=card)
    (output / "run.json").write_text(json.dumps(run, indent=1))
    shutil.rmtree(output / CHECKPOINT_DIR, ignore_errors=True)  # the run is complete: run.json and the network
    if cfg.plots:
        from .plots import plot_run

        plot_run(run, output)
    return run
