"""Classification metrics from predicted probabilities: accuracy, negative log-likelihood, and expected
calibration error with its reliability diagram (15 equal-width confidence bins, as in Guo et al., 2017)."""

from __future__ import annotations

import torch


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict[str, torch.Tensor]:
    """Per confidence bin ((b/bins, (b+1)/bins]): the mean confidence, the accuracy and the number of examples."""
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).float()
    index = torch.clamp(torch.ceil(confidence * bins).long() - 1, 0, bins - 1)
    counts = torch.bincount(index, minlength=bins).float()
    safe = counts.clamp(min=1)
    return {
        "confidence": torch.bincount(index, confidence, minlength=bins) / safe,
        "accuracy": torch.bincount(index, correct, minlength=bins) / safe,
        "count": counts,
    }


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """Σ_b (n_b / N) |accuracy_b - confidence_b|."""
    b = reliability_bins(probs, labels, bins)
    return float((b["count"] / len(labels) * (b["accuracy"] - b["confidence"]).abs()).sum())


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict[str, float]:
    """Accuracy (%), NLL (nats per example) and ECE (%) of predicted probabilities (N, classes)."""
    nll = -torch.log(probs.gather(1, labels[:, None]).clamp(min=1e-12)).mean()
    return {
        "accuracy": 100 * float((probs.argmax(1) == labels).float().mean()),
        "nll": float(nll),
        "ece": 100 * expected_calibration_error(probs, labels, bins),
    }
