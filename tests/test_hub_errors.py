"""Bad input from or about the Hub: one clear line each, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import namedtuple

import pytest
import torch
from safetensors.torch import save_file

from protos.hf_checkpoint import CheckpointError
from protos.weights import PEER, WeightsError, fetch_for_coordinator, fetch_for_peer, open_checkpoint
from protos.weights import remote as remote_module

from .hub_fixtures import hub_fixture, save_sharded  # noqa: F401

REPO = "org/tiny-mixtral"
PAIRS = [(0, 1), (1, 6)]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    return save_sharded(tmp_path_factory.mktemp("hub") / "ckpt")


def one_line(e: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(e.value)
    return str(e.value)


def test_unknown_repo(hub, tmp_path):
    with pytest.raises(WeightsError, match=r"no model repo of that name at http://127\.0\.0\.1") as e:
        open_checkpoint("org/nothing-here", None, tmp_path)
    one_line(e)


def test_gated_repo_needs_a_token(hub, full, tmp_path, monkeypatch):
    hub.add_repo(REPO, full, gated_token="hf_secret")
    with pytest.raises(WeightsError, match=r"is a gated repo: .* set HF_TOKEN") as e:
        open_checkpoint(REPO, None, tmp_path)
    one_line(e)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")  # the token goes with every request, ranged reads too
    fetch_for_peer(REPO, None, PAIRS, tmp_path, progress=False)


def test_revision_that_does_not_exist(hub, full, tmp_path):
    hub.add_repo(REPO, full)
    with pytest.raises(WeightsError, match=r"has no revision 'v9'") as e:
        open_checkpoint(REPO, "v9", tmp_path)
    one_line(e)


def test_repo_that_is_not_moe(hub, tmp_path):
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    save_file({"model.layers.0.mlp.gate_proj.weight": torch.zeros(4, 4)}, dense / "model.safetensors")
    hub.add_repo("org/dense", dense)
    with pytest.raises(CheckpointError, match="not an MoE checkpoint") as e:
        open_checkpoint("org/dense", None, tmp_path / "cache")
    one_line(e)
    assert all(t.end <= 8 + 200 for t in hub.take_log() if t.file.endswith(".safetensors"))  # its header only


def test_truncated_range_response(hub, full, tmp_path):
    repo = hub.add_repo(REPO, full)
    hub_ckpt = open_checkpoint(REPO, None, tmp_path)
    repo.short_ranges.update(f.name for f in hub_ckpt.plan(PEER, PAIRS).files)
    with pytest.raises(WeightsError, match="truncated range response") as e:
        hub_ckpt.fetch(PEER, PAIRS, progress=False)
    one_line(e)


def test_full_disk_is_refused_before_downloading(hub, full, tmp_path, monkeypatch):
    hub.add_repo(REPO, full)
    hub_ckpt = open_checkpoint(REPO, None, tmp_path)
    hub.take_log()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(remote_module.shutil, "disk_usage", lambda path: usage(10**12, 10**12, 10**6))
    with pytest.raises(WeightsError, match=r"not enough disk space in .*: this download needs") as e:
        hub_ckpt.fetch(PEER, PAIRS, progress=False)
    one_line(e)
    assert hub.take_log() == []


def test_network_gone(hub, full, tmp_path):
    hub.add_repo(REPO, full)
    url = hub.url
    hub.__exit__()
    from huggingface_hub import constants

    assert url == constants.ENDPOINT
    with pytest.raises(WeightsError, match=f"cannot reach {url}") as e:
        open_checkpoint(REPO, None, tmp_path)
    one_line(e)


def test_cli_prints_one_line(hub, full, tmp_path):
    """The real CLI, HF_ENDPOINT set before huggingface_hub is imported, as a user would run it."""
    hub.add_repo(REPO, full)
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path), "HF_TOKEN": ""}
    cases = {
        ("generate", "--model", "org/missing", "--prompt", "x", "--initial-peers", "/ip4/127.0.0.1/tcp/1"): (
            "no local folder 'org/missing' and no model repo of that name"
        ),
        (
            "generate",
            "--model",
            REPO,
            "--revision",
            "nope",
            "--prompt",
            "x",
            "--initial-peers",
            "/ip4/127.0.0.1/tcp/1",
        ): (f"{REPO} has no revision 'nope'"),
    }
    for argv, message in cases.items():
        proc = subprocess.run(
            [sys.executable, "-m", "coordinator", *argv], env=env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert f"moe-swarm: error: {message}" in proc.stderr


def test_local_folder_is_used_as_it_is(full):
    assert fetch_for_coordinator(full, None) == full
    assert fetch_for_peer(str(full), None, PAIRS) == full
