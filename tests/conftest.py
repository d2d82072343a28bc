import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # φ's Triton kernels run in Triton's interpreter on the CPU (test_phi_fused.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when Triton is imported, which the next line does

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


def strong_phi(kernel_size: int = 3, clip: float = 100.0, h_dim: int = 4) -> MetaPerturb:
    """φ with large random weights (seed 0), so that every term matters, its noise and scales differ visibly
    between inputs, and with a low `clip` some outputs reach it."""
    torch.manual_seed(0)
    phi = MetaPerturb(kernel_size=kernel_size, clip=clip, h_dim=h_dim)
    with torch.no_grad():
        for p in phi.parameters():
            p.normal_(std=0.5)
    return phi


@pytest.fixture
def phi() -> MetaPerturb:
    return strong_phi()


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


REPO = Path(__file__).resolve().parents[1]


def run_python(code_or_args, env: dict | None = None, timeout: int = 300):
    """Run Python code (a str) or a script with arguments (a list) in a fresh interpreter, as a user would."""
    import os
    import subprocess
    import sys

    args = ["-c", code_or_args] if isinstance(code_or_args, str) else list(map(str, code_or_args))
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env={**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def hub_server():
    from hub_server import HubServer

    server = HubServer()
    yield server
    server.close()


@pytest.fixture
def hub_env(hub_server, tmp_path) -> dict:
    """Environment that points huggingface_hub at the local server, with a fresh cache."""
    return {"HF_ENDPOINT": hub_server.url, "HF_HOME": str(tmp_path / "hf_home")}
