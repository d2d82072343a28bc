"""A trained network with MetaPerturb, kept in timm's pretrained format so that it can be saved, shared and reloaded.

A folder holds what timm's `save_for_hf` writes, which plain timm loads strictly
(`timm.create_model("local-dir:FOLDER", pretrained=True)`, or `"hf-hub:REPO"` once pushed):
- `config.json`: architecture, num_classes and pretrained_cfg (input size, mean, std, interpolation, crop);
- `model.safetensors`: the network's own weights, batch norm's statistics as finalized;
and beside them, like PEFT's adapter files, what MetaPerturb adds:
- `metaperturb.safetensors`: φ, the running statistics of every site, the step count and the evaluation mode
  (the state of `model.metaperturb`), its config in the metadata;
- `metaperturb_config.json`: how φ is attached (placement, sites), the schedule, φ's config and provenance, and
  φ's SHA-256, which loading checks;
- `README.md`: the model card.
`timm_metaperturb.create_model("local-dir:FOLDER" | "hf-hub:REPO", pretrained=True)` gives the network back with φ
attached in the state it was saved in.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import timm
import torch
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.models._hub import save_config_for_hf
from torch import nn

from .injection import ATTRIBUTE, MetaPerturbInjection, inject_metaperturb
from .phi import MetaPerturb
from .sites import SiteModule
from .state_dicts import mismatch_report

TIMM_CONFIG = "config.json"
NETWORK_WEIGHTS = "model.safetensors"
METAPERTURB_WEIGHTS = "metaperturb.safetensors"
METAPERTURB_CONFIG = "metaperturb_config.json"
CARD = "README.md"
FORMAT_VERSION = 1
SOURCES = ("local-dir:", "hf-hub:")


def phi_sha256(phi: MetaPerturb) -> str:
    """φ's identity: the SHA-256 of its tensors (float32, in key order) and its config."""
    digest = hashlib.sha256(json.dumps(phi.config, sort_keys=True).encode())
    for key, value in sorted(phi.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def network_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The network's own weights and buffers: its state_dict without what is attached to it (φ, regularizers)."""
    prefixes = tuple(f"{name}." for name, child in model.named_children() if isinstance(child, SiteModule))
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith(prefixes)}


def metaperturb_config(injection: MetaPerturbInjection) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "placement": injection.placement,
        "sites": [site.name for site in injection.site_list],
        "total_steps": injection.total_steps,
        "anneal": injection.anneal,
        "eval_noise": injection.mode.eval_noise,
        "phi": injection.phi.hub_config(),
        "phi_sha256": phi_sha256(injection.phi),
    }


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    data_config: dict[str, Any] | None = None,
    card: str | None = None,
) -> Path:
    """Write `model` (a timm network, with MetaPerturb or without) in timm's pretrained format, with MetaPerturb's
    files beside it when it carries φ (see the module's docstring). `data_config` is the preprocessing the network
    was trained with (input_size, mean, std, interpolation, crop_pct, crop_mode), recorded in its pretrained_cfg;
    `card` the model card's text (default: a short one). Returns the folder.

    Finalize a network trained with MetaPerturb first (`finalize_for_inference`) so that the saved network predicts
    in one deterministic pass."""
    if not hasattr(model, "pretrained_cfg"):
        raise TypeError(
            f"save_pretrained writes timm's format and needs a timm model, got {type(model).__name__}: for another "
            "network save model.state_dict() with safetensors"
        )
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(network_state_dict(model), str(folder / NETWORK_WEIGHTS))
    save_config_for_hf(model, str(folder / TIMM_CONFIG), data_config=data_config)
    injection = getattr(model, ATTRIBUTE, None)
    if isinstance(injection, MetaPerturbInjection):
        config = metaperturb_config(injection)
        state = {k: v.detach().contiguous().cpu() for k, v in injection.state_dict().items()}
        save_file(state, str(folder / METAPERTURB_WEIGHTS), metadata={"config": json.dumps(config)})
        (folder / METAPERTURB_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    (folder / CARD).write_text(card if card is not None else _default_card(model, folder))
    return folder


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    data_config: dict[str, Any] | None = None,
    card: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = "Upload network trained with MetaPerturb",
    token: str | None = None,
) -> str:
    """`save_pretrained` into a temporary folder, then upload it to the Hub repo `repo_id` (created if missing)."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp, data_config=data_config, card=card)
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision, commit_message=commit_message)
    return str(info)


def _default_card(model: nn.Module, folder: Path) -> str:
    from .model_card import network_model_card

    return network_model_card(model, source=f"local-dir:{folder}")


# -- loading -----------------------------------------------------------------------------------------------------


def _hub_download(location: str, filename: str) -> str:
    """`filename` of the Hub repo `REPO[@REVISION]` (timm's `hf-hub:` spelling without the prefix), from the cache
    or downloaded."""
    repo_id, _, revision = location.partition("@")
    return hf_hub_download(repo_id, filename, revision=revision or None)


def metaperturb_files(model_name: str) -> tuple[dict[str, Any], str] | None:
    """For `local-dir:FOLDER` or `hf-hub:REPO[@REVISION]`: MetaPerturb's config and the path of its weights, or
    None where the source holds a plain timm network. Other names: None."""
    if not model_name.startswith(SOURCES):
        return None
    source, location = model_name.split(":", 1)
    if source == "local-dir":
        config_path, weights = Path(location) / METAPERTURB_CONFIG, Path(location) / METAPERTURB_WEIGHTS
        if not config_path.is_file():
            if weights.is_file():
                raise FileNotFoundError(f"{location} has {METAPERTURB_WEIGHTS} but no {METAPERTURB_CONFIG}: copy it "
                                        "from the folder save_pretrained wrote")  # fmt: skip
            return None
        weights = str(weights) if weights.is_file() else None
    else:
        try:
            config_path = _hub_download(location, METAPERTURB_CONFIG)
        except (EntryNotFoundError, LocalEntryNotFoundError):  # a plain timm repo; or offline, where timm decides
            return None
        try:
            weights = _hub_download(location, METAPERTURB_WEIGHTS)
        except EntryNotFoundError:
            weights = None
    if weights is None:
        raise FileNotFoundError(
            f"{model_name} has {METAPERTURB_CONFIG} but no {METAPERTURB_WEIGHTS} (φ and the sites' statistics): copy "
            "or upload the whole folder save_pretrained wrote, or load the plain network with metaperturb=False"
        )
    return json.loads(Path(config_path).read_text()), weights


def network_weights_file(source: str) -> str:
    """The weights file of `source`: a checkpoint file itself, or the `model.safetensors` of a folder
    save_pretrained wrote, given as a path, `local-dir:FOLDER` or `hf-hub:REPO[@REVISION]`."""
    if source.startswith("hf-hub:"):
        return _hub_download(source.removeprefix("hf-hub:"), NETWORK_WEIGHTS)
    path = Path(source.removeprefix("local-dir:"))
    if path.is_dir():
        if not (path / NETWORK_WEIGHTS).is_file():
            raise FileNotFoundError(f"{path} has no {NETWORK_WEIGHTS}: it is not a folder save_pretrained wrote")
        return str(path / NETWORK_WEIGHTS)
    if not path.is_file():
        raise FileNotFoundError(f"{source}: no such file or folder")
    return str(path)


def check_architecture(model_name: str) -> None:
    """A local folder whose config.json names an architecture timm does not know fails here, with what to do."""
    if not model_name.startswith("local-dir:"):
        return
    config_path = Path(model_name.split(":", 1)[1]) / TIMM_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path.parent} has no {TIMM_CONFIG}: it is not a folder save_pretrained wrote")
    architecture = json.loads(config_path.read_text()).get("architecture")
    if not timm.is_model(architecture):
        raise ValueError(
            f"{config_path} names the architecture '{architecture}', which timm {timm.__version__} does not know: "
            "install the timm version, or import the package, that registers it"
        )


def attach_saved_metaperturb(model: nn.Module, config: dict[str, Any], weights: str) -> nn.Module:
    """Inject the φ saved in `weights` into `model` (a network just loaded from the same folder) and restore the
    sites' statistics, the step count and the evaluation mode; errors say which file does not fit."""
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{weights}: MetaPerturb files of format version {version}, but this timm-metaperturb "
                         f"reads version {FORMAT_VERSION}; install the release that wrote them")  # fmt: skip
    try:
        state = load_file(weights)
        with safe_open(weights, framework="pt") as f:
            file_config = json.loads((f.metadata() or {}).get("config", "null"))
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise ValueError(f"could not read {weights}: {e}. Save the network again with save_pretrained") from e
    if file_config != config:
        raise ValueError(f"{weights} and {METAPERTURB_CONFIG} beside it come from different saves: save the network "
                         "again with save_pretrained, or copy both files from one folder")  # fmt: skip
    phi = MetaPerturb.from_config(config["phi"], source=weights)
    phi.load_state_dict_strict({k[len("phi.") :]: v for k, v in state.items() if k.startswith("phi.")}, weights)
    if (found := phi_sha256(phi)) != config["phi_sha256"]:
        raise ValueError(
            f"φ in {weights} has SHA-256 {found[:12]}…, but {METAPERTURB_CONFIG} records {config['phi_sha256'][:12]}…: "
            "the file was changed after saving; download or save the network again"
        )
    input_size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    inject_metaperturb(model, phi, placement=config["placement"], input_size=input_size, anneal=config["anneal"])
    injection = model.metaperturb
    sites = [site.name for site in injection.site_list]
    if sites != config["sites"]:
        raise ValueError(
            f"{weights} holds statistics for the sites {config['sites']}, but φ finds the sites {sites} in "
            f"{type(model).__name__}: the MetaPerturb files belong to another network (or another timm version "
            "finds other blocks)"
        )
    if report := mismatch_report(injection.state_dict(), state):
        raise ValueError(f"{weights} does not fit the network's MetaPerturb: {report}")
    injection.load_state_dict(state)
    injection.schedule(config["total_steps"])
    return model
