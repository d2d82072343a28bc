from pathlib import Path

import pytest
import torch

from timm_metaperturb import MetaPerturb, load_official_checkpoint

OFFICIAL_PHI = Path(__file__).resolve().parents[2] / "shared" / "reference" / "official_phi_tin_resnet20.pth"


@pytest.fixture
def official_phi_path() -> Path:
    if not OFFICIAL_PHI.is_file():
        pytest.skip(f"the authors' checkpoint is not at {OFFICIAL_PHI} (../shared is absent)")
    return OFFICIAL_PHI


@pytest.fixture
def official_phi(official_phi_path) -> MetaPerturb:
    return load_official_checkpoint(official_phi_path)


@pytest.fixture
def phi() -> MetaPerturb:
    """A φ with parameters large enough that its noise and scales differ visibly between inputs."""
    torch.manual_seed(0)
    phi = MetaPerturb()
    with torch.no_grad():
        for p in phi.parameters():
            p.normal_(std=0.5)
    return phi


def small_cnn() -> torch.nn.Sequential:
    """A hand-written CNN for 32x32 inputs, as a user would write it."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 8 * 8, 10),
    )
