"""`moe-swarm generate` end to end: a real swarm, the CLI in its own process, tokens streamed."""

from __future__ import annotations

import contextlib
import os
import pty
import re
import signal
import subprocess
import sys
import threading

import pytest
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
        argv = ["--model", str(ckpt), "--prompt", "the swarm", "--max-new-tokens", "12"]
        code, out, err = _run_on_a_terminal([sys.executable, "-m", "coordinator", "generate", *argv,
                                             "--initial-peers", *swarm.initial_peers])  # fmt: skip
    finally:
        swarm.stop_many(procs, signal.SIGTERM)
    assert code == 0, err[-3000:]
    tok = AutoTokenizer.from_pretrained(ckpt)
    local = AutoModelForCausalLM.from_pretrained(ckpt, experts_implementation="eager").eval()
    ids = tok("the swarm", return_tensors="pt").input_ids
    with torch.inference_mode():
        want = local.generate(ids, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids))
    text = tok.decode(want[0], skip_special_tokens=True)
    assert text.startswith("the swarm")
    # on a terminal the prompt is dim, so where the continuation starts shows; nothing is inserted
    assert out.rstrip() == "\x1b[2mthe swarm\x1b[0m" + text[len("the swarm") :].rstrip(), out
    assert "tokens/s" in err
    assert "0 rerouted + 0 dropped" in err
    assert "experts with a replica: 16/16" in err


def _run_on_a_terminal(argv: list[str], timeout: float = 180) -> tuple[int, str, str]:
    """(exit code, stdout as a terminal shows it, stderr): stdout is a pseudo-terminal."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdout=slave, stderr=subprocess.PIPE, text=True)
    os.close(slave)
    chunks: list[bytes] = []

    def read() -> None:
        with contextlib.suppress(OSError):  # EIO once the child's end is closed
            while data := os.read(master, 4096):
                chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
        reader.join(10)
        os.close(master)
    return proc.returncode, b"".join(chunks).decode().replace("\r\n", "\n"), err


def _generate(swarm, ckpt, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "coordinator", "generate", "--model", str(ckpt), "--prompt", "the swarm"]
    return subprocess.Popen(
        [*argv, *extra, "--initial-peers", *swarm.initial_peers],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


NOISE = ("Traceback", "Task was destroyed", "Event loop is closed", "asynchronous generator")


@pytest.fixture(scope="module")
def slow_ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("slow") / "mixtral", "mixtral", seed=11)


def _slow_peers(swarm, ckpt, n: int) -> list:
    """Peers hosting every expert, each answer delayed 40 ms, so a run lasts long enough to interrupt."""
    args = ["--model", str(ckpt), "--experts", "*", "--threads", "1", "--sim-latency-ms", "40"]
    return swarm.start_peers({f"slow-{i}": args for i in range(n)})


def test_ctrl_c_prints_what_was_done_so_far(swarm, slow_ckpt):
    procs = _slow_peers(swarm, slow_ckpt, 1)
    try:
        gen = _generate(swarm, slow_ckpt, "--max-new-tokens", "200")
        assert gen.stdout.read(len("the swarm") + 1)  # the prompt, then the first token
        gen.send_signal(signal.SIGINT)
        _, err = gen.communicate(timeout=60)
    finally:
        swarm.stop_many(procs, signal.SIGTERM)
    assert gen.returncode == 130, err[-3000:]
    assert "interrupted (Ctrl-C) after" in err and "token-expert pairs" in err
    assert not any(n in err for n in NOISE), err[-3000:]


def test_peers_dying_mid_run_are_said_and_kept_in_the_summary(swarm, slow_ckpt):
    procs = _slow_peers(swarm, slow_ckpt, 2)
    gen = _generate(swarm, slow_ckpt, "--max-new-tokens", "30", "--fallback", "drop")
    try:
        assert gen.stdout.read(len("the swarm") + 1)
    finally:
        swarm.stop_many(procs, signal.SIGKILL)
    _, err = gen.communicate(timeout=120)
    assert gen.returncode == 0, err[-3000:]
    # said as it happens (how many at once depends on when each dead peer's ban and record lapse)
    assert "experts lost their last usable replica" in err
    for proc in procs:
        assert proc.info["peer_id"] in err  # full ids, as the peers log them
    assert "the output may differ from the model's" in err
    assert not any(n in err for n in NOISE), err[-3000:]


def test_a_checkpoint_nobody_serves_stops_with_one_line_naming_what_is_served(swarm, slow_ckpt, tmp_path):
    from coordinator.models.hf import checkpoint_info

    procs = _slow_peers(swarm, slow_ckpt, 1)
    ckpt = save_tiny_checkpoint(tmp_path / "other", "mixtral", seed=12)  # other weights: another model id
    try:
        gen = _generate(swarm, ckpt, "--wait", "2")
        _, err = gen.communicate(timeout=120)
    finally:
        swarm.stop_many(procs, signal.SIGTERM)
    assert gen.returncode == 1, err[-3000:]
    (line,) = [x for x in err.splitlines() if x.startswith("moe-swarm: error:")]
    assert "only 0 of 16 experts of this checkpoint have a replica" in line
    # what the swarm serves instead (with peers killed by earlier tests whose records have not expired yet)
    assert re.search(rf"{checkpoint_info(slow_ckpt).manifest.model_id} \(\d+ peers?\)", line), line
    assert not any(n in err for n in NOISE), err[-3000:]
