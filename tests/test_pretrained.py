"""A trained network kept in timm's format: train/target.py's output folder, save_pretrained, reloading in a new
process from a folder and from the Hub (the local server), and the errors of folders that do not fit."""

import json
import shutil

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import run_python
from safetensors.torch import load_file, save_file

import timm_metaperturb as tm
from timm_metaperturb.pretrained import METAPERTURB_CONFIG, METAPERTURB_WEIGHTS
from timm_metaperturb.training.target import TargetConfig, train_target

RUN = dict(dataset="digits", max_per_class=10, test_rest=True, hflip=False, model="conv4", image_size=16, batch_size=32,
           steps=6, eval_every=100, progress=False, plots=False)  # fmt: skip

# Reload a run's folder in a fresh interpreter and evaluate it as a user would: one pass in eval mode.
EVALUATE = """
import json, sys, torch
import timm_metaperturb as tm
from timm_metaperturb.training.data import Augmentation
from timm_metaperturb.training.metrics import classification_metrics
from timm_metaperturb.training.evaluation import predict_proba
from timm_metaperturb.training.target import TargetConfig, prepare_data
source, folder = sys.argv[1], sys.argv[2]
cfg = TargetConfig(**json.load(open(folder + "/run.json"))["config"])
_, test = prepare_data(cfg)
model = tm.create_model(source, pretrained=True).eval()
probs = predict_proba(model, test, Augmentation(cfg.crop_padding, cfg.hflip))
torch.save(probs, folder + "/reloaded.pt")
print(json.dumps(classification_metrics(probs, test.labels)))
"""


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs") / "run"
    with pytest.warns(UserWarning, match="training loss ends"):  # 6 steps are far from fitting
        run = train_target(TargetConfig(**RUN, output=str(folder)), command="python train/target.py ...")
    return folder, run


def test_target_output_is_a_timm_folder_that_reloads_to_the_run(trained_run):
    folder, run = trained_run
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", METAPERTURB_WEIGHTS, METAPERTURB_CONFIG, "README.md"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "conv4" and config["num_classes"] == 10
    assert config["pretrained_cfg"]["input_size"] == [3, 16, 16] and config["pretrained_cfg"]["mean"] == [0.5] * 3
    plain = timm.create_model(f"local-dir:{folder}", pretrained=True)  # timm alone, strict
    assert not hasattr(plain, "metaperturb")
    assert plain.state_dict().keys() == load_file(folder / "model.safetensors").keys()
    result = run_python([f"-c{EVALUATE}", f"local-dir:{folder}", folder])
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics == {k: run["final"][k] for k in metrics}, "the reloaded network is the run's, in one pass"
    card = (folder / "README.md").read_text()
    assert f"{run['final']['accuracy']:.2f}" in card and "python train/target.py" in card


def test_finalized_network_round_trips_bit_for_bit(tmp_path, phi):
    torch.manual_seed(0)
    model = tm.create_model("resnet20", num_classes=4, metaperturb=True, phi=phi, total_steps=8)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(16, 3, 32, 32), torch.arange(16) % 4
    for _ in range(3):
        model.train()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    tm.finalize_for_inference(model, x.split(5))
    expected = model(x)
    tm.save_pretrained(model, tmp_path / "net")
    reloaded = tm.create_model(f"local-dir:{tmp_path / 'net'}", pretrained=True).eval()
    assert torch.equal(reloaded(x), expected)
    injection = tm.get_injection(reloaded)
    assert injection.mode.eval_noise == "mean" and int(injection.steps_taken) == 3 and injection.strength == 3 / 3.2
    sampled = tm.create_model(f"local-dir:{tmp_path / 'net'}", pretrained=True, metaperturb=True, phi=phi).eval()
    assert tm.get_injection(sampled).mode.eval_noise == "sample", "a φ passed by the user starts afresh"
    plain = tm.create_model(f"local-dir:{tmp_path / 'net'}", pretrained=True, metaperturb=False)
    assert not hasattr(plain, "metaperturb")


def test_hub_download_gives_the_local_folders_network(trained_run, hub_server, hub_env):
    folder, _ = trained_run
    hub_server.add("some-user/digits-conv4", folder)
    result = run_python([f"-c{EVALUATE}", "hf-hub:some-user/digits-conv4", folder], hub_env)
    assert result.returncode == 0, result.stderr
    local = run_python([f"-c{EVALUATE}", f"local-dir:{folder}", folder])
    assert result.stdout.splitlines()[-1] == local.stdout.splitlines()[-1]
    assert any(METAPERTURB_WEIGHTS in path for _, path in hub_server.requests)
    fine_tune = f"""
import timm, torch, timm_metaperturb
from safetensors.torch import load_file
from timm_metaperturb.training.target import load_initial_weights
model = timm.create_model("conv4", num_classes=5)
print(load_initial_weights(model, "hf-hub:some-user/digits-conv4"))
print(torch.equal(model.blocks[0].conv.weight, load_file("{folder / "model.safetensors"}")["blocks.0.conv.weight"]))
"""
    result = run_python(fine_tune, hub_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["['fc.weight', 'fc.bias']", "True"], "all but the new classifier"


def _copy(folder, tmp_path, name):
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


def test_folders_that_do_not_fit_fail_with_what_to_do(trained_run, tmp_path, phi):
    folder, _ = trained_run

    def load(path):
        return tm.create_model(f"local-dir:{path}", pretrained=True)

    missing = _copy(folder, tmp_path, "missing")
    (missing / METAPERTURB_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=rf"no {METAPERTURB_WEIGHTS}.*metaperturb=False"):
        load(missing)

    changed = _copy(folder, tmp_path, "changed")
    state = load_file(changed / METAPERTURB_WEIGHTS)
    state["phi.scale_fc.weight"] = state["phi.scale_fc.weight"] + 1
    metadata = {"config": json.dumps(json.loads((changed / METAPERTURB_CONFIG).read_text()))}
    save_file(state, str(changed / METAPERTURB_WEIGHTS), metadata=metadata)
    with pytest.raises(ValueError, match=r"SHA-256.*changed after saving"):
        load(changed)

    mixed = _copy(folder, tmp_path, "mixed")
    config = json.loads((mixed / METAPERTURB_CONFIG).read_text())
    (mixed / METAPERTURB_CONFIG).write_text(json.dumps({**config, "anneal": 0.5}))
    with pytest.raises(ValueError, match="different saves"):
        load(mixed)

    unknown = _copy(folder, tmp_path, "unknown")
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "architecture": "conv4_of_my_own"}))
    with pytest.raises(ValueError, match=r"'conv4_of_my_own', which timm .* does not know"):
        load(unknown)

    other = tmp_path / "other"  # a resnet20 folder given conv4's MetaPerturb files
    tm.save_pretrained(tm.create_model("resnet20", num_classes=10, metaperturb=True, phi=phi), other)
    for name in (METAPERTURB_WEIGHTS, METAPERTURB_CONFIG):
        shutil.copy(folder / name, other / name)
    with pytest.raises(ValueError, match=r"statistics for the sites .* belong to another network"):
        load(other)

    with pytest.raises(TypeError, match="needs a timm model"):
        tm.save_pretrained(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1)), tmp_path / "not_timm")


def test_publish_dry_run_writes_the_folder_the_hub_would_serve(trained_run, tmp_path):
    folder, run = trained_run
    dry = run_python(["hub/publish.py", folder, "--repo-id", "some-user/digits-conv4", "--dry-run", tmp_path / "up"])
    assert dry.returncode == 0, dry.stderr
    names = sorted(p.name for p in (tmp_path / "up").iterdir())
    assert names == sorted(["README.md", "config.json", METAPERTURB_CONFIG, METAPERTURB_WEIGHTS, "model.safetensors"])
    for name in ("model.safetensors", METAPERTURB_WEIGHTS):
        assert load_file(tmp_path / "up" / name).keys() == load_file(folder / name).keys()
    card = (tmp_path / "up" / "README.md").read_text()
    assert 'tm.create_model("hf-hub:some-user/digits-conv4", pretrained=True)' in card
    assert f"{run['final']['accuracy']:.2f}" in card
