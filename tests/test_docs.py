"""The docs name only real flags, and their example command lines parse with our CLIs."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from coordinator.cli import build_parser as swarm_parser
from peer.cli import build_parser as peer_parser
from protos.plumbing.cliconfig import env_vars

pytestmark = pytest.mark.unit  # pure logic: the fast subset

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    "architecture.md",
    "protocol.md",
    "running-a-peer.md",
    "running-a-public-swarm.md",
    "joining.md",
    "troubleshooting.md",
]
PARSERS = {"moe-peer": peer_parser, "moe-swarm": swarm_parser}
# flags of other tools the docs show (docker, pip, compose)
FOREIGN_FLAGS = {"--gpus", "--restart", "--rm", "--index-url", "--build", "--help"}


def our_flags() -> set[str]:
    return {
        flag
        for build, prefix in ((peer_parser, "MOE_PEER"), (swarm_parser, "MOE_SWARM"))
        for flag in env_vars(build(), prefix).values()
    }


def commands(text: str) -> list[list[str]]:
    """moe-peer/moe-swarm command lines in the fenced shell blocks (continuations joined, comments cut)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            argv = shlex.split(line, comments=True)
            if argv and argv[0] in PARSERS:
                out.append(argv)
    return out


@pytest.mark.parametrize("name", DOCS)
def test_docs_name_only_real_flags(name):
    text = (ROOT / "docs" / name).read_text()
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*[a-z]", text))
    unknown = sorted(named - our_flags() - FOREIGN_FLAGS)
    assert not unknown, f"docs/{name} names flags no CLI has: {unknown}"
    env = set(re.findall(r"\bMOE_(?:PEER|SWARM)_[A-Z_]*[A-Z]\b", text))
    known_env = set(env_vars(peer_parser(), "MOE_PEER")) | set(env_vars(swarm_parser(), "MOE_SWARM"))
    assert not sorted(env - known_env), f"docs/{name} names variables no CLI reads: {sorted(env - known_env)}"


@pytest.mark.parametrize("name", DOCS)
def test_doc_command_lines_parse(name, monkeypatch, capsys):
    for var in [v for v in os.environ if v.startswith("MOE_")]:
        monkeypatch.delenv(var)
    for argv in commands((ROOT / "docs" / name).read_text()):
        try:
            PARSERS[argv[0]]().parse_args(argv[1:])
        except SystemExit as e:
            assert e.code == 0, f"docs/{name}: `{shlex.join(argv)}` is refused: {capsys.readouterr().err}"


def test_running_a_peer_config_example_is_accepted(tmp_path):
    (block,) = re.findall(r"```toml\n(.*?)```", (ROOT / "docs" / "running-a-peer.md").read_text(), re.S)
    (tmp_path / "moe-peer.toml").write_text(block)
    args = peer_parser().parse_args(["serve", "--config", str(tmp_path / "moe-peer.toml")])
    assert args.experts == "auto" and args.model and args.initial_peers and args.key_file
