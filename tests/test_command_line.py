"""The entry points end a user's mistake with one line and a non-zero status; `--debug` shows the traceback.
Paths that can only be local fail at once instead of being tried on the Hub."""

import subprocess
import sys
from pathlib import Path

import pytest

from timm_metaperturb.hub import missing_local_path

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )


@pytest.mark.parametrize(
    ("script", "args", "says"),
    [
        ("train/target.py", ["--dataset", "no-such-folder/of/images", "--steps", "2"], "dataset 'no-such-folder"),
        ("hub/publish.py", ["./no-such-phi", "--repo-id", "me/phi", "--dry-run", "out"], "φ 'no-such-phi' is a path"),
        ("train/target.py", ["--phi", "no-such-phi.safetensors", "--steps", "2"], "φ 'no-such-phi.safetensors'"),
    ],
)
def test_a_mistake_is_one_line_and_a_failure(script, args, says):
    done = run(script, *args)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], done.stderr
    assert "Traceback" not in done.stderr and "Hub repo id at" not in done.stderr

    debug = run(script, *args, "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and says in debug.stderr


def test_paths_that_can_only_be_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mydata").mkdir()
    for local in ("./phi", "/abs/phi", "~/phi", "a/b/c", "phi.safetensors", "weights.pth", "mydata/train"):
        assert missing_local_path(local) is not None, local
    for maybe_hub in ("owner/name", "name", "otherdata/train"):
        assert missing_local_path(maybe_hub) is None, maybe_hub
    assert missing_local_path(Path("phi")) is not None, "a Path object is local whatever its text"
    assert missing_local_path("mydata") is None  # it exists: not missing
