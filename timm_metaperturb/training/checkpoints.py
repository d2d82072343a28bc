"""The training loops' one checkpoint mechanism and one resume rule.

A checkpoint is a folder of torch files, each written through a temporary name, so that a run killed while
writing keeps its previous checkpoint. Resuming checks the run's settings against the saved ones: every setting
must match except those the run's config lists in `RESUME_FREE` (where it writes, what it shows), since a run
continued under other settings would end with a result that neither setting produces.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"  # the step, the settings and the shared state; other files hold per-process parts


def save_checkpoint_file(folder: Path, name: str, state: dict) -> None:
    """Write `state` to folder/name through a temporary file."""
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f"{name}.partial"
    torch.save(state, partial)
    os.replace(partial, folder / name)


def load_checkpoint_file(path: Path) -> dict:
    """A file written by `save_checkpoint_file` (tensors and plain values only, never a general unpickle)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a checkpoint of this run, or written only in part")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise ValueError(
            f"{path} is not a readable checkpoint ({type(error).__name__}: cut off, or not written by this "
            "training loop); delete it to start the run again"
        ) from error


def check_resumable(saved_config: dict, config: Any, path: Path) -> None:
    """The one resume rule: `config` (a dataclass with `RESUME_FREE`) may differ from the saved settings only
    in the settings it lists as free."""
    now = asdict(config)
    changed = {k: (v, now.get(k)) for k, v in saved_config.items() if k not in config.RESUME_FREE and v != now.get(k)}
    if changed:
        raise ValueError(
            f"{path} was saved by a run with other settings (checkpoint, now): {changed}; resume with the same "
            f"settings, or start again without resuming"
        )
