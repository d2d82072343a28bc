"""The library imports with the core install alone; the training harness names the extra it needs."""

import subprocess
import sys

import pytest

TRAIN_ONLY = ("datasets", "matplotlib", "accelerate", "sklearn")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_library_import_leaves_the_training_extra_alone():
    done = run_python(f"import sys, timm_metaperturb; print([m for m in {TRAIN_ONLY!r} if m in sys.modules])")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("blocked", ["datasets", "matplotlib"])
def test_library_works_and_training_names_its_extra_without_it(blocked):
    # sys.modules[name] = None makes `import name` fail as if the package were not installed
    code = (
        f"import sys; sys.modules[{blocked!r}] = None\n"
        "import torch, timm_metaperturb as tm\n"
        "model = tm.create_model('resnet20', metaperturb=True, num_classes=3)\n"
        "print(model(torch.randn(2, 3, 32, 32)).shape)\n"
        "import timm_metaperturb.training\n"
    )
    done = run_python(code)
    assert "torch.Size([2, 3])" in done.stdout, done.stderr
    assert done.returncode != 0
    package = {"sklearn": "scikit-learn"}.get(blocked, blocked)
    assert f"missing {package}" in done.stderr and 'pip install "timm-metaperturb[train]"' in done.stderr
