"""deploy/: what can be checked without docker or systemd.

The files parse; every command they run is parsed by our real CLI parsers (so a renamed
subcommand or flag, or a bad value, fails here), with the environment the container or unit
gives it; every MOE_PEER_*/MOE_SWARM_* variable they set is one our CLIs read; the torch
pins match the Makefile's; the container entrypoint really turns a bootstrap ready file into
--initial-peers.
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from coordinator.cli import build_parser as swarm_parser
from peer.cli import build_parser as peer_parser
from protos.expert_spec import parse_expert_spec
from protos.plumbing.cliconfig import env_vars

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROGRAMS = {"moe-peer": (peer_parser, "MOE_PEER"), "moe-swarm": (swarm_parser, "MOE_SWARM")}
ENTRYPOINT_VARS = {"MOE_BOOTSTRAP_READY_FILE", "MOE_BOOTSTRAP_HOST", "MOE_BOOTSTRAP_WAIT"}  # deploy/entrypoint.sh
# what the entrypoint exports from the bootstrap's ready file at run time
JOINED = {
    "MOE_PEER_INITIAL_PEERS": "/ip4/10.0.0.2/tcp/31337/p2p/12D3KooWPlaceholder",
    "MOE_SWARM_INITIAL_PEERS": "/ip4/10.0.0.2/tcp/31337/p2p/12D3KooWPlaceholder",
}
KNOWN_VARS = {var for build, prefix in PROGRAMS.values() for var in env_vars(build(), prefix)} | ENTRYPOINT_VARS


def check_vars(env: dict[str, str], where: str) -> None:
    unknown = sorted(v for v in env if v.startswith("MOE_") and v not in KNOWN_VARS)
    assert not unknown, f"{where} sets variables no CLI reads: {unknown}"


def run_cli(argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys) -> argparse.Namespace:
    """Parse argv (program name first) with our real parser, in exactly this MOE_* environment."""
    build, _ = PROGRAMS[Path(argv[0]).name]
    for var in [v for v in os.environ if v.startswith("MOE_")]:
        monkeypatch.delenv(var)
    for var, value in env.items():
        monkeypatch.setenv(var, str(value))
    try:
        return build().parse_args(argv[1:])
    except SystemExit as e:
        pytest.fail(f"{shlex.join(argv)} is refused by the CLI ({e.code}): {capsys.readouterr().err}")


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (DEPLOY / name).read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in joined.splitlines() if ln.strip()]


def image_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for op, rest in instructions:
        if op == "ENV":
            env.update(dict(item.split("=", 1) for item in shlex.split(rest)))
    return env


def makefile_torch() -> str:
    return re.search(r"^TORCH \?= torch==(\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)


@pytest.mark.unit
@pytest.mark.parametrize(("name", "index"), [("Dockerfile", r"/whl/cu\d+$"), ("Dockerfile.cpu", r"/whl/cpu$")])
def test_dockerfiles(name, index, monkeypatch, capsys):
    ins = dockerfile(name)
    ops = [op for op, _ in ins]
    assert ops[0] in ("ARG", "FROM") and "FROM" in ops
    args = dict(rest.split("=", 1) for op, rest in ins if op == "ARG")
    base = next(rest for op, rest in ins if op == "FROM")
    if name == "Dockerfile":
        assert base == "${CUDA_BASE}" and args["CUDA_BASE"].startswith("nvidia/cuda:")
    assert args["TORCH_VERSION"] == makefile_torch()  # one torch version everywhere
    assert re.search(index, args["TORCH_INDEX"]) and args["TORCH_INDEX"].startswith("https://download.pytorch.org/")
    runs = [rest for op, rest in ins if op == "RUN"]
    torch_install = next(r for r in runs if "torch==" in r)
    assert '--index-url "${TORCH_INDEX}"' in torch_install and '"torch==${TORCH_VERSION}"' in torch_install
    # torch is installed before the package, so pip keeps that build; the rest at the tested versions
    package_install = next(i for i, r in enumerate(runs) if 'pip install -c constraints.txt ".[hf]"' in r)
    assert runs.index(torch_install) < package_install
    for op, rest in ins:
        if op == "COPY":
            *sources, _ = rest.split()
            for src in sources:
                assert (ROOT / src).exists(), f"{name}: COPY {src} does not exist"
    assert "COPY deploy/entrypoint.sh /usr/local/bin/moe-entrypoint" in [f"{op} {rest}" for op, rest in ins]
    assert json.loads(next(rest for op, rest in ins if op == "ENTRYPOINT")) == ["moe-entrypoint"]
    env = image_env(ins)
    check_vars(env, name)
    # the image's default command, configured the way the header comment shows (-e MOE_PEER_MODEL=...)
    cmd = json.loads(next(rest for op, rest in ins if op == "CMD"))
    args_ = run_cli(cmd, {**env, "MOE_PEER_MODEL": "/model", **JOINED}, monkeypatch, capsys)
    assert args_.command == "serve" and args_.host == "0.0.0.0" and args_.port == 31330
    assert args_.key_file == Path("/var/lib/moe-peer/identity.key")
    assert "31330" in next(rest for op, rest in ins if op == "EXPOSE").split()


@pytest.mark.unit
def test_compose_local_swarm(monkeypatch, capsys):
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = doc["services"]
    assert set(services) == {"bootstrap", "peer1", "peer2", "peer3", "coordinator"}
    parsed = {}
    for name, svc in services.items():
        built = (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve()
        assert built.parent == DEPLOY and built.is_file()
        env = {**image_env(dockerfile(built.name)), **svc.get("environment", {})}  # the image's ENV, then the service's
        check_vars(env, f"compose service {name}")
        if "MOE_BOOTSTRAP_READY_FILE" in env:
            env.update(JOINED)
        assert isinstance(svc["command"], list), f"{name}: use the exec form (no shell between docker and our CLI)"
        parsed[name] = run_cli(svc["command"], env, monkeypatch, capsys)

    assert parsed["bootstrap"].command == "bootstrap" and parsed["bootstrap"].host == "0.0.0.0"
    ready = parsed["bootstrap"].ready_file
    for name in ("peer1", "peer2", "peer3", "coordinator"):
        svc = services[name]
        # everyone joins through the file the bootstrap writes, on the volume they share
        assert Path(svc["environment"]["MOE_BOOTSTRAP_READY_FILE"]) == ready
        assert any(v.split(":")[:2] == ["swarm", str(ready.parent)] for v in svc["volumes"])
    peers = {n: parsed[n] for n in ("peer1", "peer2", "peer3")}
    for name, args in peers.items():
        assert args.command == "serve" and args.announce_host == name  # others dial it by service name
        assert services[name]["depends_on"]["bootstrap"]["condition"] == "service_healthy"
    # the fixed specs split the tiny Mixtral's 2 layers x 8 experts; the third peer places itself
    fixed = [parse_expert_spec(peers[n].experts, 2, 8) for n in ("peer1", "peer2")]
    assert sorted(fixed[0] + fixed[1]) == [(la, e) for la in range(2) for e in range(8)]
    assert peers["peer3"].experts == "auto" and peers["peer3"].memory_budget
    gen = parsed["coordinator"]
    assert gen.command == "generate" and gen.model == peers["peer1"].model == "/model"
    assert set(services["coordinator"]["depends_on"]) == set(peers)
    bootstrap_health = services["bootstrap"]["healthcheck"]["test"]
    assert bootstrap_health[-1] == str(ready)


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


@pytest.mark.unit
def test_systemd_unit(monkeypatch, capsys):
    unit = configparser.RawConfigParser(strict=False, interpolation=None, delimiters=("=",), comment_prefixes=("#",))
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string((DEPLOY / "moe-peer.service").read_text())
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    svc = unit["Service"]
    for key in ("ExecStart", "Restart", "RestartSec", "User", "EnvironmentFile", "StateDirectory", "KillMode"):
        assert svc.get(key), f"[Service] lacks {key}"
    assert svc["Restart"] in ("on-failure", "always")
    assert svc["KillMode"] == "mixed"  # SIGTERM to the peer only, so p2pd lives until the records are withdrawn
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert "network-online.target" in unit["Unit"]["After"]
    argv = shlex.split(svc["ExecStart"])
    assert Path(argv[0]).is_absolute()
    # the example EnvironmentFile, as systemd hands it over, plus the unit's own command line
    env = read_env_file(DEPLOY / "moe-peer.env")
    check_vars(env, "deploy/moe-peer.env")
    args = run_cli([Path(argv[0]).name, *argv[1:]], env, monkeypatch, capsys)
    assert args.command == "serve" and args.experts == "auto" and args.memory_budget
    assert args.key_file.parent == Path("/var/lib") / svc["StateDirectory"]  # the key lives in the state dir
    assert args.initial_peers and args.announce_host and args.model


def run_entrypoint(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MOE_")}
    return subprocess.run(
        ["sh", str(DEPLOY / "entrypoint.sh"), "sh", "-c", 'echo "$MOE_PEER_INITIAL_PEERS|$MOE_SWARM_INITIAL_PEERS"'],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )


def test_entrypoint_joins_the_bootstrap_from_its_ready_file(tmp_path):
    ready = tmp_path / "bootstrap.json"
    peer_id = "12D3KooWDxhGpkbFXCWAhJHHLMCLMDYAKFbBqJzQW6JhvwUMY1yD"
    ready.write_text(json.dumps({"maddrs": [f"/ip4/0.0.0.0/tcp/31337/p2p/{peer_id}"], "pid": 1}))
    proc = run_entrypoint(tmp_path, {"MOE_BOOTSTRAP_READY_FILE": str(ready), "MOE_BOOTSTRAP_HOST": "localhost"})
    assert proc.returncode == 0, proc.stderr
    addr = f"/ip4/127.0.0.1/tcp/31337/p2p/{peer_id}"
    assert proc.stdout.strip() == f"{addr}|{addr}"
    # the bootstrap's own container drops a ready file left by its previous run
    run_entrypoint(tmp_path, {"MOE_SWARM_READY_FILE": str(ready)})
    assert not ready.exists()
    proc = run_entrypoint(tmp_path, {"MOE_BOOTSTRAP_READY_FILE": str(ready), "MOE_BOOTSTRAP_WAIT": "1"})
    assert proc.returncode == 1 and "no bootstrap ready file" in proc.stderr
