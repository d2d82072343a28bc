"""φ through the Hub's download path (a local server at HF_ENDPOINT), the offline cache, cards and publishing."""

import json
import re
import socket

import pytest
import torch
from conftest import run_python
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from timm_metaperturb import MetaPerturb

LOAD_AND_COMPARE = """
import sys, torch
from safetensors.torch import load_file
from timm_metaperturb import MetaPerturb
repo, revision, expected = sys.argv[1], sys.argv[2], load_file(sys.argv[3])
phi = MetaPerturb.from_pretrained(repo, revision=None if revision == "-" else revision)
assert phi.state_dict().keys() == expected.keys()
assert all(torch.equal(v, expected[k]) for k, v in phi.state_dict().items()), "not bit-exact"
print("config", phi.config)
"""

TRY_LOAD = """
import sys
from timm_metaperturb import MetaPerturb
for case in sys.argv[1:]:  # "repo" or "repo@revision"
    repo, _, revision = case.partition("@")
    try:
        MetaPerturb.from_pretrained(repo, revision=revision or None)
    except Exception as e:
        print(case, type(e).__name__, e)
    else:
        print(case, "loaded")
"""


def _serve_phi(tmp_path, hub_server, phi, repo_id="some-org/some-phi", revision="main"):
    folder = tmp_path / f"{repo_id.replace('/', '--')}-{revision}"
    phi.save_pretrained(folder, repo_id=repo_id)
    hub_server.add(repo_id, folder, revision)
    return folder


def test_download_then_offline_cache_is_bit_exact(tmp_path, hub_server, hub_env, phi):
    folder = _serve_phi(tmp_path, hub_server, phi)
    weights = folder / "model.safetensors"
    online = run_python(["-c", LOAD_AND_COMPARE, "some-org/some-phi", "-", weights], hub_env)
    assert online.returncode == 0, online.stderr
    assert ("HEAD", "/some-org/some-phi/resolve/main/model.safetensors") in hub_server.requests
    assert str(phi.config) in online.stdout

    served = len(hub_server.requests)
    offline_env = {**hub_env, "HF_HUB_OFFLINE": "1"}
    offline = run_python(["-c", LOAD_AND_COMPARE, "some-org/some-phi", "-", weights], offline_env)
    assert offline.returncode == 0, offline.stderr
    assert len(hub_server.requests) == served, "offline loading must not touch the network"


def test_revision_selects_the_version(tmp_path, hub_server, hub_env, phi):
    _serve_phi(tmp_path, hub_server, phi)
    other = MetaPerturb(channel_norm=512)
    v1 = _serve_phi(tmp_path, hub_server, other, revision="v1")
    result = run_python(["-c", LOAD_AND_COMPARE, "some-org/some-phi", "v1", v1 / "model.safetensors"], hub_env)
    assert result.returncode == 0, result.stderr
    assert "'channel_norm': 512.0" in result.stdout


def test_hub_errors_name_the_problem(tmp_path, hub_server, hub_env, phi):
    folder = _serve_phi(tmp_path, hub_server, phi)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((folder / "config.json").read_text())
    torch.save(phi.state_dict(), pickled / "pytorch_model.bin")
    hub_server.add("some-org/pickled-phi", pickled)
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    hub_server.add("some-org/no-config", no_config)

    cases = {
        "some-org/missing": "no such repository",
        "some-org/some-phi@v9": "has no revision 'v9'",
        "some-org/pickled-phi": "has no model.safetensors",  # never falls back to the pickle
        "some-org/no-config": "has no config.json",
    }
    result = run_python(["-c", TRY_LOAD, *cases], hub_env)
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    for case, expected in cases.items():
        assert expected in lines[case], (case, result.stdout, result.stderr)
        assert lines[case].startswith("FileNotFoundError")

    with socket.socket() as s:  # a port with nothing behind it: no network
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    unreachable = run_python(["-c", TRY_LOAD, "some-org/some-phi"], {**hub_env, "HF_ENDPOINT": closed})
    assert "could not be reached" in unreachable.stdout, unreachable.stdout + unreachable.stderr
    offline = run_python(["-c", TRY_LOAD, "some-org/some-phi"], {**hub_env, "HF_HUB_OFFLINE": "1"})
    assert "not in the local cache" in offline.stdout, offline.stdout + offline.stderr


def test_local_errors_name_the_problem(tmp_path, phi):
    with pytest.raises(FileNotFoundError, match="is a path, and nothing exists there"):
        MetaPerturb.from_pretrained(str(tmp_path / "no" / "such" / "folder"))
    with pytest.raises(FileNotFoundError, match="not a valid repo id"):
        MetaPerturb.from_pretrained("not a repo id")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        MetaPerturb.from_pretrained(empty)
    phi.save_pretrained(tmp_path / "phi")
    config = json.loads((tmp_path / "phi" / "config.json").read_text())
    (tmp_path / "phi" / "config.json").write_text(json.dumps({**config, "format_version": 2}))
    with pytest.raises(ValueError, match="format version 2"):
        MetaPerturb.from_pretrained(tmp_path / "phi")
    (tmp_path / "phi" / "config.json").write_text(json.dumps({**config, "h_dimension": 4}))
    with pytest.raises(ValueError, match=r"unknown \['h_dimension'\]"):
        MetaPerturb.from_pretrained(tmp_path / "phi")
    (tmp_path / "phi" / "config.json").write_text(json.dumps(config))
    (tmp_path / "phi" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
        MetaPerturb.from_pretrained(tmp_path / "phi")


def _python_blocks(card: ModelCard) -> str:
    return "\n".join(re.findall(r"```python\n(.*?)```", card.text, re.S))


def test_official_phi_card_and_publish_dry_run(tmp_path, hub_server, hub_env, official_phi_path):
    imported = run_python(["hub/import_official.py", official_phi_path, tmp_path / "official"])
    assert imported.returncode == 0, imported.stderr
    dry = run_python(
        ["hub/publish.py", tmp_path / "official", "--repo-id", "metaperturb/official-tin", "--dry-run", tmp_path / "up"]
    )
    assert dry.returncode == 0, dry.stderr
    assert sorted(p.name for p in (tmp_path / "up").iterdir()) == ["README.md", "config.json", "model.safetensors"]

    card = ModelCard.load(tmp_path / "up" / "README.md")
    assert card.data.library_name == "timm-metaperturb" and card.data.license == "apache-2.0"
    assert {"metaperturb", "timm", "regularization"} <= set(card.data.tags)
    assert "63f47f80b32a00840b3af0b84ae778543de27c7eb9450d76261bfacad182211f" in card.text
    assert "| meta-training steps | 750 |" in card.text and "reported (paper, Table 1)" in card.text

    original = torch.load(official_phi_path, map_location="cpu", weights_only=True)
    uploaded = load_file(tmp_path / "up" / "model.safetensors")
    assert torch.equal(uploaded["scale_fc.weight"], original["fc.weight"])

    hub_server.add("metaperturb/official-tin", tmp_path / "up")
    snippet = _python_blocks(card)
    assert 'phi="metaperturb/official-tin"' in snippet
    ran = run_python(snippet, hub_env)
    assert ran.returncode == 0, ran.stderr
    assert "9 sites" in ran.stdout


def test_card_without_provenance_renders(tmp_path, phi):
    phi.save_pretrained(tmp_path / "phi")
    card = ModelCard.load(tmp_path / "phi" / "README.md")
    assert card.data.library_name == "timm-metaperturb"
    assert "No transfer results recorded" in card.text
    assert f'phi="{tmp_path / "phi"}"' in _python_blocks(card)


def test_shipped_default_phi_card_and_snippet():
    from timm_metaperturb.loading import DEFAULT_PHI_DIR

    card = ModelCard.load(DEFAULT_PHI_DIR / "README.md")
    assert card.data.library_name == "timm-metaperturb" and "metaperturb" in card.data.tags
    assert "fashion_mnist" in card.text and "train/meta.py" in card.text and "resnet20" in card.text
    snippet = _python_blocks(card)
    assert "phi=" not in snippet, "the default needs no phi="
    ran = run_python(snippet, {"HF_HUB_OFFLINE": "1"})
    assert ran.returncode == 0, ran.stderr
    assert "9 sites" in ran.stdout
    default = MetaPerturb.from_pretrained(DEFAULT_PHI_DIR)
    assert default.provenance["source_classes"] == "0-4" and default.provenance["steps"] > 0


def test_set_default_ships_the_old_default_on_under_a_name(tmp_path, monkeypatch):
    import shutil

    import hub.set_default as set_default
    from timm_metaperturb import load_phi, loading

    default, named = tmp_path / "default_phi", tmp_path / "phis"
    shutil.copytree(loading.DEFAULT_PHI_DIR, default)
    for module in (loading, set_default):
        monkeypatch.setattr(module, "DEFAULT_PHI_DIR", default)
        monkeypatch.setattr(module, "PACKAGED_PHIS_DIR", named)
    old = MetaPerturb.from_pretrained(default).state_dict()
    torch.manual_seed(0)
    MetaPerturb().save_pretrained(tmp_path / "new")
    new = MetaPerturb.from_pretrained(tmp_path / "new").state_dict()

    set_default.main([str(tmp_path / "new"), "--keep-current-as", "previous"])
    assert loading.packaged_phis() == ["previous"]
    assert all(torch.equal(load_phi(None).state_dict()[k], v) for k, v in new.items())
    assert all(torch.equal(load_phi("previous").state_dict()[k], v) for k, v in old.items())
    assert 'phi="previous"' in _python_blocks(ModelCard.load(named / "previous" / "README.md"))
    with pytest.raises(SystemExit, match="already ships"):
        set_default.main([str(tmp_path / "new"), "--keep-current-as", "previous"])
