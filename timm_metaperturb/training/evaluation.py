"""Evaluating a target network: softmax probabilities over a test set (Monte-Carlo for stochastic methods, or the
deterministic pass after batch norm's re-estimation), the final evaluations a run reports, and how far φ's noise
keeps the training loss up. Every function takes the images in memory (`ImageTensors`) or streamed
(`StreamedImages`) alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..injection import ATTRIBUTE, MetaPerturbInjection, eval_noise_as, get_injection
from ..recalibration import recalibrate_batchnorm
from ..sites import SiteModule
from .corruptions import corrupted_sets, held_out_subset
from .data import Augmentation, ImageTensors
from .metrics import classification_metrics
from .streaming import StreamedImages, batches_of

RECALIBRATION_IMAGES = 4096  # batch norm's re-estimation uses at most this many training images (a fixed subset)
KEPT_BYTES = 2**30  # and, streamed, at most this many bytes of them, decoded once


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict_proba(model: nn.Module, data, aug: Augmentation, passes: int = 1) -> Tensor:
    """Softmax probabilities of `data`'s images averaged over `passes` forward passes (Monte-Carlo for stochastic
    methods)."""
    model.eval()
    total = None
    for _ in range(passes):
        probs = torch.cat([F.softmax(model(x), 1).cpu() for x, _ in batches_of(data, aug, _device(model))])
        total = probs if total is None else total + probs
    return total / passes


class ReestimationBatches:
    """The unaugmented training images batch norm is re-estimated on, re-iterable (it is read once per layer): at
    most `limit` of them, a fixed random subset. In memory they are sliced afresh on each pass; streamed ones are
    decoded once and kept as float batches on the CPU, at most KEPT_BYTES of them (about 1,700 images at 224 px)."""

    def __init__(self, train, aug: Augmentation, device, limit: int = RECALIBRATION_IMAGES) -> None:
        streamed = isinstance(train, StreamedImages)
        if streamed:
            first = next(item for i in range(len(train)) if (item := train[(i, None)]) is not None)  # readable
            limit = min(limit, max(1, KEPT_BYTES // (4 * first[0].numel())))
        order = None
        if len(train) > limit:
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:limit].sort().values
        self.train, self.aug, self.device, self.order = train, aug, device, order
        self.kept = [x for x, _ in batches_of(train, aug, "cpu", order=order)] if streamed else None

    def __iter__(self) -> Iterator[Tensor]:
        if self.kept is not None:
            return (x.to(self.device) for x in self.kept)
        return (x for x, _ in batches_of(self.train, self.aug, self.device, order=self.order))


@contextmanager
def recalibrated(model: nn.Module, train, aug: Augmentation) -> Iterator[None]:
    """Batch norm's statistics re-estimated on the (unaugmented) training images in the model's evaluation mode
    (`recalibrate_batchnorm`) for the block, restored afterwards."""
    with restored_buffers(model):  # the re-estimation changes batch norm's buffers only
        recalibrate_batchnorm(model, ReestimationBatches(train, aug, _device(model)))
        yield


def predict_recalibrated(model: nn.Module, test, aug: Augmentation, train) -> Tensor:
    """One deterministic pass after re-estimating batch norm's statistics on the training images."""
    with recalibrated(model, train, aug):
        return predict_proba(model, test, aug)


@contextmanager
def restored_buffers(model: nn.Module) -> Iterator[None]:
    """Run a block that changes the model's buffers (batch norm's and φ's statistics), then put them back."""
    saved = [(b, b.clone()) for b in model.buffers()]
    try:
        yield
    finally:
        for buffer, value in saved:
            buffer.copy_(value)


def training_loss_with_and_without_noise(model: nn.Module, train, aug: Augmentation, batch_size: int) -> dict:
    """The cross-entropy on the (unaugmented, shuffled) training images in training mode at full strength, with
    φ's noise sampled ("noise") and replaced by its expectation ("expected"; φ's scales from the batch's statistics
    as in training), other regularizers off: how far the noise keeps the training loss above what the same network
    reaches without it. Side-effect free: batch norm's and φ's statistics, the strength, φ's modes and the random
    state are restored."""
    injection = get_injection(model)
    strength = injection.strength
    device = _device(model)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))  # batches of mixed classes
    losses = {}
    with restored_buffers(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        injection.strength = 1.0
        for name in ("noise", "expected"):
            model.train()
            for other in (m for m in model.modules() if isinstance(m, SiteModule) and m is not injection):
                other.eval()  # φ alone: the regularizers trained beside it stay off
            if name == "expected":
                injection.training = False  # φ's noise as at eval; the sites keep the batch's statistics
            with eval_noise_as(model, "mean" if name == "expected" else injection.mode.eval_noise):
                total = sum(F.cross_entropy(model(x), y.to(device), reduction="sum").item()
                            for x, y in batches_of(train, aug, device, batch_size, order))  # fmt: skip
            losses[name] = total / len(train)
        injection.strength = strength
    model.eval()
    return losses


# The final training loss of the benchmarks' runs (benchmarks/runs): below 0.05 nats without φ; with φ's noise,
# below 0.25 wherever it was measured, except the φ meta-trained on Fashion-MNIST 0-4 on two rendered-letter targets
# (1.2-1.3), 13 points behind the authors' φ on one of them and 1 ahead on the other.
UNFIT_TRAINING_LOSS = 0.5


def unfit_warning(losses: dict[str, float]) -> str | None:
    """What to tell a user whose network, with φ's noise, ends far from fitting its training images (the measure
    of `training_loss_with_and_without_noise`), or None when it fits."""
    if losses["noise"] <= UNFIT_TRAINING_LOSS:
        return None
    return (
        f"with φ's noise the training loss ends at {losses['noise']:.2f} nats ({losses['expected']:.2f} with the "
        f"noise replaced by its expectation), where networks trained without φ end below 0.05: the noise may be too "
        "strong for this task, or training too short. Compare with --method base on held-out data, and try another "
        "φ (--phi) or more --steps."
    )


def has_phi(model: nn.Module) -> bool:
    return isinstance(getattr(model, ATTRIBUTE, None), MetaPerturbInjection)


def held_out_test(test, count: int, evaluation: str) -> tuple[Tensor, Tensor]:
    """(uint8 images, labels) of the `count` test images the corrupted and adversarial evaluations share."""
    if isinstance(test, StreamedImages):
        raise ValueError(f"the {evaluation} evaluation needs the test images in memory: run with --loader memory")
    keep = held_out_subset(count, len(test))
    return test.images[keep], test.labels[keep]


def evaluate_modes(model: nn.Module, test, aug: Augmentation, modes: list[str], train=None) -> dict[str, dict]:
    """Test metrics under several evaluations. With MetaPerturb: "N" = Monte-Carlo average of N sampled passes
    (the largest N's passes shared by the smaller ones), "mean" = one pass with the noise replaced by its
    expectation, "mean-bn" = the same after re-estimating batch norm's statistics in that mode on `train` (see
    `recalibrate_batchnorm`); keys "sample-N", "mean", "mean-bn". Without it (baselines): "final" and, for
    "mean-bn", "final-bn" (the deterministic pass after the same re-estimation). The model is left as it was."""
    phi = has_phi(model)
    if "mean-bn" in modes and train is None:
        raise ValueError("the 'mean-bn' evaluation needs the training images")
    results, total = {}, None
    counts = sorted({int(m) for m in modes if m.isdigit()}) if phi else []
    with eval_noise_as(model, "sample") if phi else nullcontext():
        for n in range(1, (counts[-1] if counts else 0) + 1):
            probs = predict_proba(model, test, aug)
            total = probs if total is None else total + probs
            if n in counts:
                results[f"sample-{n}"] = classification_metrics(total / n, test.labels)
    deterministic = "mean" if phi else "final"
    with eval_noise_as(model, "mean") if phi else nullcontext():
        if "mean" in modes or not phi:
            results[deterministic] = classification_metrics(predict_proba(model, test, aug), test.labels)
        if "mean-bn" in modes:
            probs = predict_recalibrated(model, test, aug, train)
            results[f"{deterministic}-bn"] = classification_metrics(probs, test.labels)
    return results


def evaluate_corrupted(model: nn.Module, test, aug: Augmentation, train, count: int, cache=None) -> dict:
    """The tables' default evaluation (one deterministic pass, noise at its expectation, batch norm re-estimated on
    `train`) on `count` of the test images, clean and under every corruption type and severity (`corruptions.py`):
    {"images": n, "clean": metrics, "corrupted": {type: {severity: metrics}}}. The model is left as it was."""
    images, labels = held_out_test(test, count, "corrupted")
    sets = {("clean", 0): images, **corrupted_sets(images, cache=cache)}
    results: dict = {"images": len(labels), "corrupted": {}}
    with eval_noise_as(model, "mean") if has_phi(model) else nullcontext(), recalibrated(model, train, aug):
        for (name, severity), corrupted in sets.items():
            probs = predict_proba(model, ImageTensors(corrupted, labels, test.class_names), aug)
            metrics = classification_metrics(probs, labels)
            if name == "clean":
                results["clean"] = metrics
            else:
                results["corrupted"].setdefault(name, {})[str(severity)] = metrics
    return results
