"""`moe-peer serve --model org/name` and `moe-swarm generate --model org/name` as a user runs them,
against the local Hub server: each process downloads only its share, and the swarm's text
equals the local model's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import torch

from coordinator.sim.local_swarm import LocalSwarm
from protos.weights.spans import total

from .hub_fixtures import expert_spans, header_bytes, save_sharded, sent_inside, sent_to
from .hub_server import HubServer

REPO = "org/tiny-mixtral"
SPECS = {"hub-a": ("*:0-3", range(4)), "hub-b": ("*:4-7", range(4, 8))}
PROMPT, NEW = "the swarm", 12


def _hub_env(hub: HubServer, home: str) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.url, "HF_HOME": home, "HF_HUB_OFFLINE": "0", "HF_TOKEN": ""}


def test_peers_and_generate_download_their_share_and_equal_the_local_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    full = save_sharded(tmp_path / "full")
    experts = expert_spans(full)
    expert_bytes = sum(total(s) for s in experts.values())
    with HubServer() as hub, LocalSwarm(tmp_path / "swarm") as swarm:
        hub.add_repo(REPO, full)
        swarm.start_bootstrap()
        for name, (spec, ids) in SPECS.items():  # one at a time: each one's traffic is its own
            env = _hub_env(hub, str(tmp_path / f"hf-{name}"))
            swarm.start_peers({name: ["--model", REPO, "--experts", spec, "--threads", "1"]}, env={name: env})
            log = hub.take_log()
            ours = expert_spans(full, [(layer, e) for layer in (0, 1) for e in ids])
            share = sum(total(s) for s in ours.values())
            assert share == expert_bytes // 2
            assert sent_to(log) <= 1.05 * (share + header_bytes(full)), (name, sent_to(log), share)
            assert sent_inside(log, experts) == sent_inside(log, ours) == share  # no other expert's byte
        env = {**os.environ, **_hub_env(hub, str(tmp_path / "hf-coordinator"))}
        argv = ["generate", "--model", REPO, "--prompt", PROMPT, "--max-new-tokens", str(NEW)]
        result = subprocess.run(
            [sys.executable, "-m", "coordinator", *argv, "--initial-peers", *swarm.initial_peers],
            capture_output=True,
            text=True,
            timeout=180,
            env=env,
        )
        coordinator_log = hub.take_log()
        swarm.stop_many([p for p in swarm.processes if p.name in SPECS], signal.SIGTERM)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sent_inside(coordinator_log, experts) == 0  # no routed-expert byte
    assert sent_to(coordinator_log) > 0
    assert "downloaded" in result.stderr
    tok = AutoTokenizer.from_pretrained(full)
    local = AutoModelForCausalLM.from_pretrained(full, experts_implementation="eager").eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        want = local.generate(ids, max_new_tokens=NEW, do_sample=False, attention_mask=torch.ones_like(ids))
    assert result.stdout.strip() == tok.decode(want[0], skip_special_tokens=True).strip()
    assert "0 rerouted + 0 dropped" in result.stderr


def test_auto_placement_downloads_only_the_experts_it_picked(tmp_path):
    full = save_sharded(tmp_path / "full")
    experts = expert_spans(full)
    one_expert = sum(total(s) for s in expert_spans(full, [(0, 0)]).values())
    with HubServer() as hub, LocalSwarm(tmp_path / "swarm") as swarm:
        hub.add_repo(REPO, full)
        swarm.start_bootstrap()
        argv = ["--model", REPO, "--experts", "auto", "--memory-budget", str(3 * one_expert), "--threads", "1"]
        (peer,) = swarm.start_peers({"hub-auto": argv}, env={"hub-auto": _hub_env(hub, str(tmp_path / "hf-auto"))})
        log = hub.take_log()
        picked = [tuple(int(x) for x in uid.rsplit("/", 2)[1:]) for uid in peer.info["experts"]]
        swarm.stop_many([peer], signal.SIGTERM)
    assert len(picked) == 3  # what the budget holds
    assert sent_inside(log, experts) == sent_inside(log, expert_spans(full, picked)) == 3 * one_expert
