"""Meta-training φ (eq. 3 of the paper), over any number of processes through Accelerate.

Every task has its own network, local to the process that runs it; φ is shared. Each step, every task
(1) trains its network on a training batch with φ held fixed, then (2) computes the loss of a validation batch
(batch norm statistics frozen) whose gradient w.r.t. φ is summed over the process's tasks, summed over all
processes, divided by the number of tasks, and applied by one optimizer step on φ, identical on every process.
No second-order terms. Every random draw (network initialisation, batches, augmentation, φ's noise) is seeded
from (seed, task, step), so the result does not depend on how the tasks are spread over processes, and an
interrupted run resumed from a checkpoint ends with the same φ.
"""

from __future__ import annotations

import json
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..injection import get_injection, inject_metaperturb
from ..loading import load_phi
from ..phi import MetaPerturb
from .checkpoints import STATE_FILE, check_resumable, load_checkpoint_file, save_checkpoint_file
from .corruptions import corrupt_each, corruption_types
from .cpu_memory import keep_freed_memory
from .data import (
    Augmentation,
    EpochSampler,
    ImageTensors,
    augment,
    load_image_dataset,
    normalise,
    seed_for,
    share_of_rank,
    to_tensors,
)
from .provenance import machine, run_environment
from .tasks import Task, make_tasks, parse_classes


@dataclass
class MetaTrainConfig:
    """Every knob of a meta-training run; the defaults are the reference recipe."""

    dataset: str = "fashion_mnist"
    dataset_split: str = "train"
    val_split: str | None = None  # validation images from this split of each source (default: the task's own half)
    val_corruptions: str | None = None  # corrupt every validation image with one of these types or families
    classes: str | None = None
    groups: int = 5
    extra_sources: list[str] = field(default_factory=list)  # "DATASET:CLASSES:GROUPS", tasks of their own
    task_split: str = "class_wise"
    train_per_class: int | None = None
    model: str = "resnet20"
    image_size: int = 32
    steps: int = 750
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 5e-4
    phi_lr: float = 1e-3
    phi_weight_decay: float = 5e-4
    phi_scale_lr: float | None = None  # the scale function's learning rate; default phi_lr
    init_phi: str | None = None  # start from this φ (anything `load_phi` takes) instead of the paper's initialisation
    clip: float = 100.0
    channel_norm: float = 64.0
    spatial_norm: float | None = None
    placement: str = "pre_activation"
    crop_padding: int = 4
    hflip: bool = True
    seed: int = 0
    output: str = "outputs/meta"
    checkpoint_every: int = 0
    resume_from: str | None = None
    log_every: int = 10
    report_to: str | None = None
    cpu: bool = False
    channels_last: bool = False

    # the settings a resumed run may change: where it writes, what it reports, and how long it goes on (nothing in a
    # meta-training step depends on the total, so a finished run resumed with more steps is that longer run)
    RESUME_FREE = ("output", "checkpoint_every", "resume_from", "log_every", "report_to", "steps")

    def sources(self) -> list[tuple[str, str | None, int]]:
        """(dataset, classes, groups) of every source dataset: `dataset` first, then each of `extra_sources`."""
        return [(self.dataset, self.classes, self.groups), *map(parse_source, self.extra_sources)]


@contextmanager
def frozen_statistics(net: nn.Module):
    """Batch norm in eval mode, and φ's per-site running statistics left as they were; φ itself still uses the
    batch's statistics (its scale must see the batch to get a gradient)."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.training]
    sites = list(get_injection(net).sites.values())
    saved = [(s.running_mean.clone(), s.running_var.clone()) for s in sites]
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m in norms:
            m.train()
        with torch.no_grad():
            for s, (mean, var) in zip(sites, saved, strict=True):
                s.running_mean.copy_(mean)
                s.running_var.copy_(var)


class TaskRunner:
    """One task: its network (with the shared φ injected), its optimizer, its data samplers."""

    def __init__(self, task: Task, data: ImageTensors, cfg: MetaTrainConfig, phi: MetaPerturb, device) -> None:
        self.task, self.cfg, self.phi, self.device = task, cfg, phi, device
        self.aug = Augmentation(cfg.crop_padding, cfg.hflip)
        torch.manual_seed(seed_for(cfg.seed, "init", task.index))
        net = timm.create_model(cfg.model, num_classes=len(task.classes))
        size = (3, cfg.image_size, cfg.image_size)
        layout = torch.channels_last if cfg.channels_last else torch.preserve_format
        self.net = inject_metaperturb(net, phi, placement=cfg.placement, input_size=size, train_phi=True)
        self.net.to(device, memory_format=layout)
        params = [p for n, p in self.net.named_parameters() if not n.startswith("metaperturb.")]
        self.optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.images = {"train": data.images[task.train], "val": data.images[task.val]}
        if cfg.val_corruptions:
            seed = seed_for(cfg.seed, "val-corruptions", task.index)
            self.images["val"] = corrupt_each(self.images["val"], corruption_types(cfg.val_corruptions), seed)
        self.labels = {"train": task.remap(data.labels[task.train]), "val": task.remap(data.labels[task.val])}
        self.samplers = {
            split: EpochSampler(len(self.labels[split]), cfg.batch_size, seed_for(cfg.seed, "data", split, task.index))
            for split in ("train", "val")
        }

    def _batch(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.samplers[split].next()
        images = self.images[split][idx]
        x = (
            augment(images, self.aug, self.samplers[split].generator)
            if split == "train"
            else normalise(images, self.aug)
        )
        return x.to(self.device), self.labels[split][idx].to(self.device)

    def step(self, step: int) -> torch.Tensor:
        """Train the network one step with φ fixed; add this task's validation gradient to φ's .grad.
        Returns (train loss, train accuracy, validation loss, validation accuracy)."""
        self.net.train()
        torch.manual_seed(seed_for(self.cfg.seed, "step", step, self.task.index, "train"))
        self.phi.requires_grad_(False)
        x, y = self._batch("train")
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

        torch.manual_seed(seed_for(self.cfg.seed, "step", step, self.task.index, "val"))
        self.phi.requires_grad_(True)
        xv, yv = self._batch("val")
        with frozen_statistics(self.net):
            val_logits = self.net(xv)
        val_loss = F.cross_entropy(val_logits, yv)
        grads = torch.autograd.grad(val_loss, list(self.phi.parameters()))
        for p, g in zip(self.phi.parameters(), grads, strict=True):
            p.grad.add_(g)
        accuracy = (logits.argmax(1) == y).float().mean()
        val_accuracy = (val_logits.argmax(1) == yv).float().mean()
        return torch.stack([loss.detach(), accuracy, val_loss.detach(), val_accuracy]).cpu()

    def state_dict(self) -> dict:
        return {
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "samplers": {k: s.state_dict() for k, s in self.samplers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        for k, s in self.samplers.items():
            s.load_state_dict(state["samplers"][k])


def _check_model(name: str) -> None:
    if not timm.is_model(name):
        raise ValueError(f"unknown source network '{name}': pass a timm model name (see timm.list_models())")


def _flat_grad(phi: MetaPerturb) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in phi.parameters()])


def _set_flat_grad(phi: MetaPerturb, flat: torch.Tensor) -> None:
    offset = 0
    for p in phi.parameters():
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def parse_source(text: str) -> tuple[str, str | None, int]:
    """'fashion_mnist:0-4:2' -> ('fashion_mnist', '0-4', 2); an empty CLASSES ('digits::2') means all classes."""
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not parts[0] or not parts[2].isdigit():
        raise ValueError(f"a source is DATASET:CLASSES:GROUPS, e.g. fashion_mnist:0-4:2 or digits::2; got {text!r}")
    return parts[0], parts[1] or None, int(parts[2])


def source_tasks(cfg: MetaTrainConfig) -> tuple[ImageTensors, list[Task]]:
    """The source datasets (`dataset`, then each of `extra_sources`) as one ImageTensors whose labels run on from
    one dataset to the next, and the tasks of each, split within that dataset: a task never mixes domains."""
    sources = cfg.sources()
    parts: list[ImageTensors] = []
    tasks: list[Task] = []
    for name, classes, groups in sources:
        data = to_tensors(load_image_dataset(name, cfg.dataset_split), cfg.image_size)
        own = make_tasks(data.labels, groups, cfg.seed, parse_classes(classes), cfg.task_split,
                         min_images=cfg.batch_size, train_per_class=cfg.train_per_class)  # fmt: skip
        if cfg.val_split:
            data, own = _validate_on_split(data, own, load_image_dataset(name, cfg.val_split), cfg)
        first_image, first_class = sum(len(p) for p in parts), sum(len(p.class_names) for p in parts)
        tasks += [
            Task(len(tasks) + t.index, tuple(c + first_class for c in t.classes), t.train + first_image,
                 t.val + first_image)
            for t in own
        ]  # fmt: skip
        names = data.class_names if len(sources) == 1 else [f"{name}/{c}" for c in data.class_names]
        parts.append(ImageTensors(data.images, data.labels + first_class, names))
    if len(parts) == 1:
        return parts[0], tasks
    joined = ImageTensors(
        torch.cat([p.images for p in parts]),
        torch.cat([p.labels for p in parts]),
        [c for p in parts for c in p.class_names],
    )
    return joined, tasks


def _validate_on_split(data: ImageTensors, tasks: list[Task], other, cfg: MetaTrainConfig):
    """Each task validates on the images of its classes in another split (for the glyph sources, other fonts), so that
    φ is meta-trained for test images unlike the training images, as a user's often are."""
    held = to_tensors(other, cfg.image_size)
    if held.class_names != data.class_names:
        raise ValueError(f"split {cfg.val_split!r} has other classes than split {cfg.dataset_split!r}")
    first = len(data)
    joined = ImageTensors(torch.cat([data.images, held.images]), torch.cat([data.labels, held.labels]),
                          data.class_names)  # fmt: skip
    tasks = [
        Task(
            t.index,
            t.classes,
            t.train,
            torch.nonzero(torch.isin(held.labels, torch.tensor(t.classes))).flatten() + first,
        )
        for t in tasks
    ]
    small = [t.index for t in tasks if len(t.val) < cfg.batch_size]
    if small:
        raise ValueError(f"tasks {small} have fewer than {cfg.batch_size} validation images in split {cfg.val_split!r}")
    return joined, tasks


def initial_phi(cfg: MetaTrainConfig) -> MetaPerturb:
    """φ before its first step: the paper's initialisation drawn from the run's seed, or a copy of `cfg.init_phi`
    (to go on learning what one φ learned, e.g. with another source or another rate for its scale function)."""
    torch.manual_seed(seed_for(cfg.seed, "phi"))
    phi = MetaPerturb(clip=cfg.clip, channel_norm=cfg.channel_norm, spatial_norm=cfg.spatial_norm or cfg.image_size)
    if cfg.init_phi is None:
        return phi
    start = load_phi(cfg.init_phi)
    differ = {k: (v, phi.config[k]) for k, v in start.config.items() if k != "momentum" and v != phi.config[k]}
    if differ:
        raise ValueError(
            f"--init-phi {cfg.init_phi} was built with other settings than this run, (its, this run's): {differ}; "
            "pass the same --clip, --channel-norm and --spatial-norm (or --image-size) as the φ was made with"
        )
    phi.load_state_dict(start.state_dict())
    return phi


def phi_parameter_groups(phi: MetaPerturb, cfg: MetaTrainConfig) -> list[dict]:
    """φ's parameters for its optimizer: one group, or the noise generator's and the scale function's apart when
    the scale function has its own learning rate (meta-training on letters moves the noise and leaves the scale
    near its initialisation)."""
    if cfg.phi_scale_lr is None:
        return [{"params": list(phi.parameters())}]
    named = list(phi.named_parameters())
    return [
        {"params": [p for n, p in named if phi.is_noise_parameter(n)]},
        {"params": [p for n, p in named if not phi.is_noise_parameter(n)], "lr": cfg.phi_scale_lr},
    ]


def meta_train(cfg: MetaTrainConfig, accelerator, command: str = "") -> MetaPerturb:
    """Run (or resume) meta-training; on the main process, write `output/phi` (hub format) and `output/run.json`."""
    _check_model(cfg.model)
    if cfg.val_corruptions:
        corruption_types(cfg.val_corruptions)  # a misspelt type fails before the data is loaded
    started = time.time()
    if accelerator.device.type == "cpu":
        keep_freed_memory()
    output = Path(cfg.output)
    data, tasks = source_tasks(cfg)
    phi = initial_phi(cfg).to(accelerator.device)
    phi_optimizer = torch.optim.Adam(phi_parameter_groups(phi, cfg), lr=cfg.phi_lr, weight_decay=cfg.phi_weight_decay)
    local = list(range(len(tasks))[share_of_rank(len(tasks), accelerator.process_index, accelerator.num_processes)])
    runners = [TaskRunner(tasks[i], data, cfg, phi, accelerator.device) for i in local]
    for p in phi.parameters():
        p.grad = torch.zeros_like(p)

    start, history, elapsed = 0, [], 0.0  # elapsed: wall time spent before this process started, when resuming
    if cfg.resume_from:
        start, history, elapsed = _resume(cfg, phi, phi_optimizer, runners)
    if cfg.report_to:
        accelerator.init_trackers("metaperturb", config={k: v for k, v in asdict(cfg).items() if v is not None})
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not accelerator.is_main_process)
    for step in bar:
        for p in phi.parameters():
            p.grad.zero_()
        metrics = torch.zeros(len(tasks), 4)
        for runner in runners:
            metrics[runner.task.index] = runner.step(step)
        flat = accelerator.reduce(_flat_grad(phi), reduction="sum") / len(tasks)
        _set_flat_grad(phi, flat)
        phi_optimizer.step()
        metrics = accelerator.reduce(metrics.to(accelerator.device), reduction="sum").cpu()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            history.append(_log(step + 1, metrics, accelerator, bar))
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            shared = {"step": step + 1, "config": asdict(cfg), "history": history, "phi": phi.state_dict(),
                      "phi_optimizer": phi_optimizer.state_dict(),
                      "elapsed": elapsed + time.time() - started}  # fmt: skip
            save_checkpoint(output / "checkpoints" / f"step_{step + 1}", shared, accelerator, runners)

    flat_phi = torch.cat([p.detach().flatten() for p in phi.parameters()])
    everyone = accelerator.gather(flat_phi[None])
    identical = bool((everyone == everyone[0]).all())
    if accelerator.is_main_process:
        run_warnings = [w] if (w := collapse_warning(history)) else []
        for warning in run_warnings:
            warnings.warn(warning, stacklevel=2)
        wall_time = elapsed + time.time() - started
        _write_outputs(cfg, phi, tasks, history, identical, accelerator.num_processes, wall_time, command, run_warnings)
    accelerator.end_training()
    return phi


def collapse_warning(history: list[dict], rise: float = 1.5) -> str | None:
    """A warning when the tasks' validation loss ended above `rise` times its lowest: the run's φ then harms the
    networks it was meant to help (seen on one of three seeds of the same recipe), and an earlier checkpoint or
    another seed serves better."""
    if not history:
        return None
    best = min(history, key=lambda record: record["val_loss"])
    last = history[-1]
    if last["val_loss"] <= rise * best["val_loss"]:
        return None
    return (
        f"the tasks' validation loss rose from {best['val_loss']:.2f} at step {best['step']} to "
        f"{last['val_loss']:.2f} at step {last['step']} (accuracy {best['val_acc']:.2f} to {last['val_acc']:.2f}): "
        "this φ hurts the networks it was meta-trained with. Meta-train again with another --seed, or keep the φ of "
        f"a checkpoint up to step {best['step']}: the same command with --resume-from OUTPUT/checkpoints/step_K "
        "--steps K writes it."
    )


def _log(step: int, metrics: torch.Tensor, accelerator, bar) -> dict:
    names = ("train_loss", "train_acc", "val_loss", "val_acc")
    record = {"step": step, **{n: metrics[:, i].mean().item() for i, n in enumerate(names)}}
    record["tasks"] = [dict(zip(names, row.tolist(), strict=True)) for row in metrics]
    bar.set_postfix(train_loss=f"{record['train_loss']:.3f}", val_loss=f"{record['val_loss']:.3f}")
    flat = {n: record[n] for n in names}
    flat.update({f"task{t}/{n}": v for t, row in enumerate(record["tasks"]) for n, v in row.items()})
    accelerator.log(flat, step=step)
    return record


def save_checkpoint(path: Path, shared: dict, accelerator, runners) -> None:
    """`shared` (step, settings, φ and its optimizer) written by the main process; every task's network,
    optimizer and samplers in `task_{i}.pt`, written by the process that runs it (so a resume may use another
    number of processes)."""
    accelerator.wait_for_everyone()
    for runner in runners:
        save_checkpoint_file(path, f"task_{runner.task.index}.pt", runner.state_dict())
    if accelerator.is_main_process:
        save_checkpoint_file(path, STATE_FILE, shared)
    accelerator.wait_for_everyone()


def _resume(cfg: MetaTrainConfig, phi: MetaPerturb, phi_optimizer, runners) -> tuple[int, list, float]:
    path = Path(cfg.resume_from)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume-from {path} is not a meta-training checkpoint (no {STATE_FILE})")
    state = load_checkpoint_file(path / STATE_FILE)
    check_resumable(state["config"], cfg, path)
    if state["step"] > cfg.steps:
        raise ValueError(f"{path} is at step {state['step']}, past --steps {cfg.steps}: resume with at least that many")
    phi.load_state_dict(state["phi"])
    phi_optimizer.load_state_dict(state["phi_optimizer"])
    for runner in runners:
        runner.load_state_dict(load_checkpoint_file(path / f"task_{runner.task.index}.pt"))
    return state["step"], state["history"], state.get("elapsed", 0.0)  # checkpoints of older versions lack it


def _write_outputs(cfg, phi, tasks, history, identical, world_size, wall_time, command, run_warnings) -> None:
    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    sources = cfg.sources()
    phi.provenance = {
        "title": f"MetaPerturb φ meta-trained on {' + '.join(s[0] for s in sources)} with {cfg.model}",
        "source_dataset": " + ".join(s[0] for s in sources),
        "source_classes": " + ".join(s[1] or "all" for s in sources),
        "train_per_class": cfg.train_per_class,
        "val_split": cfg.val_split,
        "val_corruptions": cfg.val_corruptions,
        "init_phi": cfg.init_phi,
        "tasks": len(tasks),
        "source_model": cfg.model,
        "steps": cfg.steps,
        "seed": cfg.seed,
        "command": command,
        "wall_time": f"{wall_time / 60:.1f} min ({world_size} processes)",
        "machine": machine(),
    }
    phi.save_pretrained(output / "phi")
    run = {
        "config": asdict(cfg),
        "command": command,
        "world_size": world_size,
        **run_environment(),
        "phi_identical_across_processes": identical,
        "warnings": run_warnings,
        "wall_time_s": wall_time,
        "tasks": [
            {"index": t.index, "classes": list(t.classes), "train": len(t.train), "val": len(t.val)} for t in tasks
        ],
        "history": history,
        "phi": {k: v.tolist() for k, v in phi.state_dict().items()},
    }
    (output / "run.json").write_text(json.dumps(run, indent=1))
