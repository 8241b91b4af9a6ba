"""`moe-swarm generate` end to end: a real swarm, the CLI in its own process, tokens streamed."""

from __future__ import annotations

import signal
import subprocess
import sys

import torch

from coordinator.models.tiny import save_tiny_checkpoint


def test_generate_streams_tokens_and_reports_exact_counts(swarm, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = save_tiny_checkpoint(tmp_path / "mixtral", "mixtral", seed=11)
    procs = swarm.start_peers(
        {
            f"gen-{i}": ["--model", str(ckpt), "--experts", spec, "--threads", "1"]
            for i, spec in enumerate(["*:0-3", "*:4-7"])
        }
    )
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "coordinator",
                "generate",
                "--model",
                str(ckpt),
                "--prompt",
                "the swarm",
                "--max-new-tokens",
                "12",
                "--initial-peers",
                *swarm.initial_peers,
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
    finally:
        swarm.stop_many(procs, signal.SIGTERM)
    assert result.returncode == 0, result.stderr[-3000:]
    tok = AutoTokenizer.from_pretrained(ckpt)
    local = AutoModelForCausalLM.from_pretrained(ckpt, experts_implementation="eager").eval()
    ids = tok("the swarm", return_tensors="pt").input_ids
    with torch.inference_mode():
        want = local.generate(ids, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids))
    assert result.stdout.strip() == tok.decode(want[0], skip_special_tokens=True).strip()
    assert "tokens/s" in result.stderr
    assert "0 rerouted + 0 dropped" in result.stderr
    assert "experts with a replica: 16/16" in result.stderr
