"""Accuracy under L∞ PGD attacks made by `torchattacks`, in the tables' default evaluation (one deterministic pass,
batch norm re-estimated on the training images), or in MetaPerturb's sampled evaluation under EOT-PGD, which
averages the attack's gradient over sampled noises as the paper attacked φ. Each restart starts from another random
point; an image counts as robust only if no restart fools the network.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from ..injection import eval_noise_as
from .data import Augmentation, seed_for
from .evaluation import has_phi, held_out_test, recalibrated

EPSILONS = (1 / 255, 2 / 255, 4 / 255, 8 / 255)


class OnUnitImages(nn.Module):
    """The model taking images in [0, 1], as attacks bound them: normalised with the run's mean and std first."""

    def __init__(self, model: nn.Module, aug: Augmentation) -> None:
        super().__init__()
        self.model = model
        device = next(model.parameters()).device
        self.register_buffer("mean", torch.as_tensor(aug.mean, dtype=torch.float32, device=device).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(aug.std, dtype=torch.float32, device=device).reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def _predict(model: nn.Module, x: torch.Tensor, passes: int) -> torch.Tensor:
    with torch.no_grad():
        return sum(model(x).softmax(1) for _ in range(passes)).argmax(1)


def adversarial_accuracy(model: nn.Module, test, aug: Augmentation, train, count: int,
                         epsilons: tuple[float, ...] = EPSILONS, steps: int = 20, restarts: int = 1,
                         eot: int = 0, seed: int = 0, batch_size: int = 250) -> dict:  # fmt: skip
    """Accuracy (%) on `count` test images (the same subset as the corrupted evaluation) under PGD with `steps` steps
    of 2.5 eps / steps and `restarts` random starts, for each eps in `epsilons` (images in [0, 1]); with `eot` > 0,
    MetaPerturb's noise is sampled, the attack is EOT-PGD over `eot` samples and accuracy averages `eot` passes.
    The model is left as it was."""
    try:
        import torchattacks
    except ImportError as error:
        raise ImportError(
            "the adversarial evaluation needs torchattacks: pip install --no-deps torchattacks==3.5.1 (its pin of "
            "requests 2.25 would break huggingface_hub; it needs none of requests' newer versions)"
        ) from error

    phi = has_phi(model)
    if eot and not phi:
        raise ValueError("EOT-PGD is for MetaPerturb's sampled evaluation; a deterministic network takes eot=0")
    images, labels = held_out_test(test, count, "adversarial")
    device = next(model.parameters()).device
    images, labels = (images.float() / 255).to(device), labels.to(device)
    wrapped = OnUnitImages(model, aug)
    passes = max(eot, 1)
    results = {"images": len(labels), "steps": steps, "restarts": restarts, "eot": eot, "accuracy": {}}
    with eval_noise_as(model, "sample" if eot else "mean") if phi else nullcontext(), recalibrated(model, train, aug):
        wrapped.eval()
        torch.manual_seed(seed_for("adversarial", seed) % 2**63)
        robust = _predict(wrapped, images, passes) == labels
        results["accuracy"]["0"] = 100 * robust.float().mean().item()
        for eps in epsilons:
            alpha = 2.5 * eps / steps
            attack = (torchattacks.EOTPGD(wrapped, eps, alpha, steps, eot_iter=eot) if eot
                      else torchattacks.PGD(wrapped, eps, alpha, steps, random_start=True))  # fmt: skip
            torch.manual_seed(seed_for("adversarial", seed, eps) % 2**63)
            robust = _predict(wrapped, images, passes) == labels
            for _ in range(restarts):
                for part in torch.arange(len(labels), device=device).split(batch_size):
                    adversarial = attack(images[part], labels[part])
                    robust[part] &= _predict(wrapped, adversarial, passes) == labels[part]
            results["accuracy"][f"{eps * 255:g}/255"] = 100 * robust.float().mean().item()
    return results
