"""φ on disk and on the Hugging Face Hub: `model.safetensors` + `config.json` + a model card (`README.md`).

`PhiHubMixin` gives MetaPerturb huggingface_hub's `save_pretrained` / `from_pretrained` / `push_to_hub`, with
two differences from `PyTorchModelHubMixin`: loading is strict (a missing, extra or mis-shaped tensor is an
error, never a silently random parameter) and never unpickles (safetensors only).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelHubMixin, constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .state_dicts import mismatch_report

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".json")


def missing_local_path(source: str | os.PathLike) -> str | None:
    """Why `source`, which does not exist, must be a local path and not a Hub repo id (so that it fails at once
    instead of waiting on the Hub), or None where it may be a repo id. A repo id is `name` or `owner/name`."""
    text = str(source)
    if os.path.exists(text):
        return None
    path_like = text.startswith(("/", "./", "../", "~")) or "\\" in text or text.count("/") > 1
    if isinstance(source, os.PathLike) or path_like:
        return f"'{text}' is a path, and nothing exists there"
    if text.lower().endswith(FILE_SUFFIXES):
        return f"'{text}' names a file, and no such file exists"
    first = text.split("/")[0]
    if "/" in text and os.path.isdir(first):
        return f"'{text}' does not exist, although the folder '{first}' does"
    return None


class PhiHubMixin(ModelHubMixin):
    """Persistence of φ: its `config` (constructor arguments) and `provenance` (how it was made, for the card)
    travel in config.json and in the safetensors metadata, so one `.safetensors` file is self-contained."""

    provenance: dict[str, Any]
    config: dict[str, Any]

    def hub_config(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **self.config, "provenance": self.provenance}

    def _save_pretrained(self, save_directory: Path) -> None:
        config = self.hub_config()
        state = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(Path(save_directory) / WEIGHTS_NAME), metadata={"config": json.dumps(config)})
        (Path(save_directory) / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")

    def save_pretrained(self, save_directory: str | Path, *, repo_id: str | None = None, **kwargs) -> str | None:
        """Write model.safetensors, config.json and, unless one exists, a model card whose usage snippet loads φ
        from `repo_id` (or from the folder itself)."""
        card_kwargs = dict(kwargs.pop("model_card_kwargs", None) or {})
        card_kwargs.setdefault("phi_source", repo_id or str(save_directory))
        return super().save_pretrained(save_directory, repo_id=repo_id, model_card_kwargs=card_kwargs, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        card_kwargs = dict(kwargs.pop("model_card_kwargs", None) or {})
        card_kwargs.setdefault("phi_source", repo_id)
        return super().push_to_hub(repo_id, model_card_kwargs=card_kwargs, **kwargs)

    def generate_model_card(self, phi_source: str | None = None, **kwargs) -> ModelCard:
        """The card; its usage snippet loads φ from `phi_source`, or uses the package's default φ when None."""
        from .model_card import phi_model_card

        return phi_model_card(self, phi_source)

    # -- loading -------------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str):
        """Build φ from a config.json dict, checking its format version and keys."""
        version = config.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{source}: φ config of format version {version}, but this timm-metaperturb reads version "
                f"{FORMAT_VERSION}; install the timm-metaperturb release that wrote it"
            )
        expected = set(cls._hub_mixin_init_parameters) - {"self"}
        given = set(config) - {"format_version", "provenance"}
        if given != expected:
            raise ValueError(
                f"{source}: φ config has keys {sorted(given)}, expected {sorted(expected)}: missing "
                f"{sorted(expected - given) or 'none'}, unknown {sorted(given - expected) or 'none'}"
            )
        phi = cls(**{k: config[k] for k in expected})
        phi.provenance = dict(config.get("provenance") or {})
        return phi

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        force_download: bool = False,
        token: str | bool | None = None,
        local_files_only: bool = False,
    ):
        """Load φ from a folder saved by `save_pretrained`, one `.safetensors` file it wrote, or a Hub repo id
        (with `revision`; from the cache when offline, `HF_HUB_OFFLINE=1`)."""
        source = str(pretrained_model_name_or_path)
        if os.path.isfile(source):
            return cls.from_safetensors_file(source)
        hint = f"folder '{source}'"
        if (reason := missing_local_path(pretrained_model_name_or_path)) is not None:
            raise FileNotFoundError(f"φ {reason}: pass a save_pretrained folder, a .safetensors file or a Hub repo id")
        if not os.path.isdir(source):
            hint = f"'{source}' is not a local file or folder, so it was tried as a Hub repo id at {constants.ENDPOINT}"
            if revision:
                hint += f" (revision '{revision}')"
        try:
            return super().from_pretrained(
                source,
                revision=revision,
                cache_dir=cache_dir,
                force_download=force_download,
                token=token,
                local_files_only=local_files_only,
            )
        except HFValidationError as e:
            raise FileNotFoundError(f"{hint}, but it is not a valid repo id (owner/name) either: {e}") from e
        except RevisionNotFoundError as e:
            raise FileNotFoundError(f"{hint}: the repository has no revision '{revision}'") from e
        except RepositoryNotFoundError as e:
            raise FileNotFoundError(
                f"{hint}: no such repository (check the name, and log in for a private repository)"
            ) from e
        except LocalEntryNotFoundError as e:
            raise FileNotFoundError(
                f"{hint}: the Hub could not be reached (no network, or HF_HUB_OFFLINE=1) and φ is not in the local "
                f"cache ({cache_dir or constants.HF_HUB_CACHE}); download it once while online"
            ) from e
        except EntryNotFoundError as e:
            raise FileNotFoundError(
                f"{hint}: the repository has no {WEIGHTS_NAME}, so it does not hold a φ saved by save_pretrained"
            ) from e

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        config: dict | None = None,
        **model_kwargs,
    ):
        download = dict(
            repo_id=model_id,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            token=token,
            local_files_only=local_files_only,
        )
        if config is None:
            if not os.path.isdir(model_id):  # ModelHubMixin hides why config.json did not come: ask again
                try:
                    hf_hub_download(filename=CONFIG_NAME, **download)
                except RemoteEntryNotFoundError:
                    pass
            raise FileNotFoundError(
                f"'{model_id}' has no {CONFIG_NAME}: it does not hold a φ saved by MetaPerturb.save_pretrained"
            )
        phi = cls.from_config(config, source=model_id)
        if os.path.isdir(model_id):
            weights = os.path.join(model_id, WEIGHTS_NAME)
            if not os.path.isfile(weights):
                raise FileNotFoundError(f"folder '{model_id}' has {CONFIG_NAME} but no {WEIGHTS_NAME}")
        else:
            weights = hf_hub_download(filename=WEIGHTS_NAME, **download)
        phi.load_weights(weights)
        return phi

    @classmethod
    def from_safetensors_file(cls, path: str | os.PathLike):
        """Load φ from one `.safetensors` file whose metadata carries its config."""
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
        except Exception as e:  # safetensors raises its own error types for truncated or garbled files
            raise ValueError(f"could not read φ weights from {path}: {e}. Is it a safetensors file?") from e
        if "config" not in metadata:
            raise ValueError(
                f"{path} has no MetaPerturb config in its safetensors metadata; save φ with save_pretrained() "
                "or load the folder that holds config.json beside the weights"
            )
        phi = cls.from_config(json.loads(metadata["config"]), source=str(path))
        phi.load_weights(path)
        return phi

    def load_weights(self, path: str | os.PathLike) -> None:
        """Strictly load a safetensors file: a missing, extra or mis-shaped tensor is an error, never ignored."""
        try:
            state = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for truncated or garbled files
            raise ValueError(f"could not read φ weights from {path}: {e}. Is it a safetensors file?") from e
        self.load_state_dict_strict(state, source=str(path))

    def load_state_dict_strict(self, state: dict[str, torch.Tensor], source: str) -> None:
        """load_state_dict that names every missing, unexpected and mis-shaped tensor of `source`."""
        own = self.state_dict()
        if report := mismatch_report(own, state):
            raise ValueError(f"{source} does not hold a φ with config {self.config}: {report}")
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(state[k])
