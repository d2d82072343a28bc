"""Model cards (README.md): `phi_model_card` for a φ (Hub metadata, what φ is, how it was made, how it transfers,
how to use it) and `network_model_card` for a network trained with it.

What the card says of a φ's origin comes from `phi.provenance`, a JSON-able dict saved in config.json:
`title`, `origin`, `source_dataset`, `dataset_id` (a Hub dataset id, for the metadata), `source_classes`,
`train_per_class`, `val_split`, `val_corruptions`, `init_phi`, `tasks`, `source_model`, `steps`, `seed`, `command`,
`wall_time`, `machine`, `notes`, and `results`, a list of rows (dicts with the same keys) of transfer results, each
saying whether it was measured or reported.
"""

from __future__ import annotations

from huggingface_hub import ModelCard, ModelCardData

MADE_BY = (
    ("origin", "origin"),
    ("source_dataset", "source dataset"),
    ("source_classes", "source classes"),
    ("train_per_class", "training images per class in each task (at most)"),
    ("val_split", "tasks validate on the source's split"),
    ("val_corruptions", "validation images corrupted by"),
    ("init_phi", "meta-training started from the φ"),
    ("tasks", "meta-training tasks"),
    ("source_model", "source network"),
    ("steps", "meta-training steps"),
    ("seed", "seed"),
    ("wall_time", "wall time"),
    ("machine", "machine"),
    ("command", "command"),
)

CITATION = """@inproceedings{ryu2020metaperturb,
  title={MetaPerturb: Transferable Regularizer for Heterogeneous Tasks and Architectures},
  author={Ryu, Jeongun and Shin, Jaewoong and Lee, Hae Beom and Hwang, Sung Ju},
  booktitle={Advances in Neural Information Processing Systems},
  year={2020}
}"""


def _table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def phi_model_card(phi, phi_source: str | None) -> ModelCard:
    """The card of `phi`, whose usage snippet loads it from `phi_source` (a Hub repo id or a folder), or, when
    None, uses it as the φ timm-metaperturb ships (no `phi=` needed)."""
    info = dict(phi.provenance)
    base = type(phi)._hub_mixin_info.model_card_data.to_dict()
    data = ModelCardData(
        library_name=base["library_name"],
        license=base["license"],
        tags=sorted(set(base["tags"]) - {"model_hub_mixin"}),
        datasets=[info["dataset_id"]] if info.get("dataset_id") else None,
    )
    made = [f"| {label} | {_cell(info[key])} |" for key, label in MADE_BY if info.get(key) not in (None, "")]
    made_table = "\n".join(["| | |", "| --- | --- |", *made]) if made else "Not recorded."
    results = _table(info["results"]) if info.get("results") else "No transfer results recorded for this φ yet."
    config = ", ".join(f"`{k}={v}`" for k, v in phi.config.items())
    load = f', phi="{phi_source}"' if phi_source else ""
    which = "with φ after every block" if phi_source else "with this φ, the package's default, after every block"
    body = f"""
# {info.get("title", "MetaPerturb φ")}

A MetaPerturb perturbation function φ (Ryu et al., NeurIPS 2020): {sum(p.numel() for p in phi.parameters())}
parameters, shared by every block of a CNN. After each block it multiplies the feature map by input-dependent
softplus noise (from a channel-permutation-equivariant 3x3 set function) times a per-channel scale in [0, 1]
(from batch statistics in training, running estimates at eval). φ is meta-learned once on a source dataset and
then transferred, frozen, to new datasets and architectures as a regularizer with no hyperparameters to tune.

Configuration: {config}.

## How it was made

{made_table}
{chr(10) + info["notes"] + chr(10) if info.get("notes") else ""}
## Transfer results

{results}

## Usage

```bash
pip install timm-metaperturb
```

```python
import timm_metaperturb as tm

# the paper's ResNet-20 (any timm CNN works) {which}
model = tm.create_model("resnet20", num_classes=10, metaperturb=True{load}, total_steps=10_000)
print(len(tm.get_injection(model).site_list), "sites")
```

φ stays frozen: train the network as usual. With `total_steps`, the length of training in optimizer steps, the
perturbation strength rises from 0 to 1 over the first 40% of them by itself.

## Files

- `model.safetensors`: φ's weights (also carries `config.json` in its metadata).
- `config.json`: φ's configuration, format version and provenance.

## Citation

```bibtex
{CITATION}
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def _cell(value) -> str:
    text = str(value)
    return f"`{text}`" if "--" in text or text.startswith(("python", "accelerate")) else text


def network_model_card(model, source: str, run: dict | None = None) -> str:
    """The card of a trained network saved by `save_pretrained`, loadable from `source` (`local-dir:...` or
    `hf-hub:...`); `run` is train/target.py's run.json, for the dataset, the method, the metrics and the command."""
    from .pretrained import phi_sha256

    architecture = model.pretrained_cfg.get("architecture", type(model).__name__)
    injection = getattr(model, "metaperturb", None)
    data = ModelCardData(library_name="timm", tags=["image-classification", "timm", "metaperturb"])
    registered = " (after `import timm_metaperturb`, which registers it)." if _registered_here(architecture) else "."
    lines = [f"# {architecture} trained with {'MetaPerturb' if injection is not None else 'timm-metaperturb'}", ""]
    if run is not None:
        config, final = run["config"], run["final"]
        lines += [
            f"Trained on `{config['dataset']}` ({run['data']['train']} training images, {len(run['data']['classes'])} "
            f"classes) with {' + '.join(run['methods'])}, {config['steps']} steps.",
            "",
            "| test images | accuracy (%) | NLL | ECE (%) | evaluation |",
            "| --- | --- | --- | --- | --- |",
            f"| {run['data']['test']} | {final['accuracy']:.2f} | {final['nll']:.3f} | {final['ece']:.2f} | "
            f"{_evaluation(config, run)} |",
            "",
        ]
        lines += [f"Command: `{run['command']}`", ""] if run.get("command") else []
    if injection is not None:
        phi = injection.phi
        lines += [
            f"φ: {phi.provenance.get('title', 'MetaPerturb φ')}, SHA-256 `{phi_sha256(phi)}`; "
            f"{len(injection.site_list)} sites; evaluation noise: {injection.mode.eval_noise}.",
            "",
        ]
    lines += [
        "## Usage",
        "",
        "```python",
        "import timm_metaperturb as tm",
        "",
        f'model = tm.create_model("{source}", pretrained=True)  # φ attached as saved; model.eval() to predict',
        "```",
        "",
        f'Plain timm loads the network without φ: `timm.create_model("{source}", pretrained=True)`{registered}',
        "",
        "## Files",
        "",
        "- `config.json`, `model.safetensors`: the network in timm's format.",
    ]
    if injection is not None:
        lines.append("- `metaperturb.safetensors`, `metaperturb_config.json`: φ, its sites' statistics and settings.")
    lines += ["", "## Citation", "", "```bibtex", CITATION, "```", ""]
    return f"---\n{data.to_yaml()}\n---\n" + "\n".join(lines)


def _evaluation(config: dict, run: dict) -> str:
    if "metaperturb" not in run["methods"]:
        return "one pass"
    if config.get("eval_noise") == "mean":
        return "one deterministic pass, batch norm re-estimated"
    return f"{run['final']['passes']} sampled passes"


def _registered_here(architecture: str) -> bool:
    """Whether this package, not timm, registers `architecture` (resnet20, conv4, ...)."""
    from timm.models import is_model, model_entrypoint

    return is_model(architecture) and model_entrypoint(architecture).__module__.startswith(__package__)
