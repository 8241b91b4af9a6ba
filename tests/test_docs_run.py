"""The README's and the docs' commands and Python snippets run, as written, against a fresh swarm.

The placeholders a reader replaces (a checkpoint folder, a Hub id, the bootstrap address, a
model id) are replaced with a tiny local Mixtral and this swarm's address; everything else is
the text of the docs. Commands that run until stopped (serve, bootstrap, dashboard) or that
are benchmarks and simulations with their own tests are only parsed (tests/test_docs.py).
"""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.models.hf import checkpoint_info
from coordinator.models.tiny import save_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FILES = ["README.md", "docs/joining.md", "docs/running-a-peer.md", "docs/troubleshooting.md", "docs/architecture.md"]
RUNS_UNTIL_STOPPED = {"serve", "bootstrap", "dashboard", "api", "simulate", "bench", "demo"}
NOISE = ("Traceback", "Task was destroyed", "Event loop is closed")
HUB_IDS = re.compile(r"mistralai/Mixtral-8x7B-v0\.1")
# the checkpoint stands in for the draft model too: any model sharing its tokenizer drafts
PLACEHOLDER_DIRS = re.compile(r"/path/to/checkpoint|/path/to/small-model|\bHF_DIR\b")


@pytest.fixture(scope="module")
def docs_swarm(swarm, tmp_path_factory):
    """Two peers serving a tiny Mixtral (half the experts each) in the session's swarm."""
    ckpt = save_tiny_checkpoint(tmp_path_factory.mktemp("docs") / "mixtral", "mixtral", seed=5)
    procs = swarm.start_peers(
        {f"docs-{i}": ["--model", str(ckpt), "--experts", spec] for i, spec in enumerate(["*:0-3", "*:4-7"])}
    )
    yield swarm, ckpt, checkpoint_info(ckpt)
    swarm.stop_many(procs, signal.SIGTERM)


def fill(text: str, swarm, ckpt: Path, info, home: Path) -> str:
    """The docs' placeholders, made real."""
    text = HUB_IDS.sub(str(ckpt), PLACEHOLDER_DIRS.sub(str(ckpt), text))
    text = re.sub(r"mixtral-0123456789abcdef --layers \d+ --experts \d+", info.manifest.model_id, text)
    text = text.replace("~/", f"{home}/")
    text = re.sub(r"(--initial-peers) (\.\.\.|/ip4/\S+)", rf"\1 {' '.join(swarm.initial_peers)}", text)
    return re.sub(r"initial_peers = \[.*?\]", f"initial_peers = {list(swarm.initial_peers)!r}", text)


def shell_commands(text: str) -> list[list[str]]:
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            argv = shlex.split(line, comments=True)
            ours = len(argv) > 1 and argv[0] in ("moe-peer", "moe-swarm")
            if ours and argv[1] not in RUNS_UNTIL_STOPPED and "--dry-run" not in argv:
                out.append(argv)
    return out


def python_snippets(text: str) -> list[str]:
    """Whole programs: snippets that say where the swarm is (a fragment that uses names defined
    elsewhere is not one)."""
    return [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "initial_peers = " in b]


def run(argv: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.timeout(900)  # about a dozen CLI runs and two programs, each importing torch and joining the DHT
def test_every_runnable_doc_command_and_snippet_succeeds(docs_swarm, tmp_path):
    swarm, ckpt, info = docs_swarm
    commands, snippets = [], []
    for name in FILES:
        text = fill((ROOT / name).read_text(), swarm, ckpt, info, tmp_path)
        commands += [(name, argv) for argv in shell_commands(text)]
        snippets += [(name, code) for code in python_snippets(text)]
    kinds = {argv[1] for _, argv in commands}
    assert {"generate", "status", "keygen"} <= kinds, kinds  # the docs still show these: they are run here
    assert len(snippets) >= 2
    for name, argv in commands:
        module = "peer" if argv[0] == "moe-peer" else "coordinator"
        result = run([sys.executable, "-m", module, *argv[1:]])
        said = f"{name}: `{shlex.join(argv)}` exited {result.returncode}:\n{result.stderr[-3000:]}"
        assert result.returncode == 0, said
        assert not any(n in result.stderr for n in NOISE), said
    for name, code in snippets:
        result = run([sys.executable, "-c", code])
        assert result.returncode == 0, f"{name}: snippet failed:\n{code}\n{result.stderr[-3000:]}"
        assert result.stdout.strip(), f"{name}: snippet printed nothing:\n{code}"
