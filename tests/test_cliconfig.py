"""Every CLI flag from the command line, the environment or a TOML file: precedence and clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.cli import build_parser as swarm_parser
from peer.cli import build_parser as peer_parser
from protos.limits import DEFAULT_MAX_ROWS


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for var in [v for v in os.environ if v.startswith(("MOE_PEER_", "MOE_SWARM_"))]:
        monkeypatch.delenv(var)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "moe.toml"
    path.write_text(text)
    return path


def serve(*argv: str):
    return peer_parser().parse_args(["serve", *argv])


@pytest.mark.unit
def test_precedence_cli_over_env_over_file_over_default(tmp_path, monkeypatch):
    assert serve("--seed", "0").max_rows == DEFAULT_MAX_ROWS
    cfg = write(tmp_path, "max-rows = 100\nport = 7001\n")
    assert serve("--seed", "0", "--config", str(cfg)).max_rows == 100
    monkeypatch.setenv("MOE_PEER_MAX_ROWS", "200")
    args = serve("--seed", "0", "--config", str(cfg))
    assert (args.max_rows, args.port) == (200, 7001)  # env beats the file; the file still fills the rest
    assert serve("--seed", "0", "--config", str(cfg), "--max-rows", "300").max_rows == 300
    assert serve("--seed", "0", "--max-rows=300").max_rows == 300
    # the config file itself can come from the environment
    monkeypatch.setenv("MOE_PEER_CONFIG", str(cfg))
    assert serve("--seed", "0").port == 7001


@pytest.mark.unit
def test_subcommand_tables_override_top_level_keys(tmp_path):
    cfg = write(
        tmp_path,
        'timeout = 5.0\ninitial-peers = ["/ip4/10.0.0.1/tcp/1/p2p/A"]\n'
        "[generate]\ntimeout = 9\nno_hedge = true\n[bench.layer]\ntokens = 16\n",
    )
    args = swarm_parser().parse_args(["--config", str(cfg), "generate", "--model", "m", "--prompt", "hi"])
    assert args.timeout == 9.0 and isinstance(args.timeout, float)
    assert args.initial_peers == ["/ip4/10.0.0.1/tcp/1/p2p/A"]  # satisfied a required flag
    assert args.no_hedge is True
    assert args.model == "m"  # a folder or a Hub repo id, as given
    bench = swarm_parser().parse_args(["bench", "layer", "--config", str(cfg)])
    assert bench.tokens == 16


@pytest.mark.unit
def test_env_values_are_parsed_like_the_command_line(monkeypatch):
    monkeypatch.setenv("MOE_SWARM_INITIAL_PEERS", "/ip4/a/tcp/1/p2p/A '/ip4/b/tcp/2/p2p/B'")
    monkeypatch.setenv("MOE_SWARM_NO_HEDGE", "yes")
    monkeypatch.setenv("MOE_SWARM_MODEL", "/models/x")
    monkeypatch.setenv("MOE_SWARM_PROMPT", "once upon")
    monkeypatch.setenv("MOE_SWARM_FALLBACK", "drop")
    args = swarm_parser().parse_args(["generate"])
    assert args.initial_peers == ["/ip4/a/tcp/1/p2p/A", "/ip4/b/tcp/2/p2p/B"]
    assert (args.no_hedge, args.model, args.prompt, args.fallback) == (True, "/models/x", "once upon", "drop")
    monkeypatch.setenv("MOE_SWARM_NO_HEDGE", "0")
    assert swarm_parser().parse_args(["generate"]).no_hedge is False


@pytest.mark.unit
def test_mutually_exclusive_flags_resolve_by_precedence(tmp_path, monkeypatch):
    cfg = write(tmp_path, '[serve]\ncheckpoint = "/ckpt"\n')
    args = serve("--config", str(cfg))
    assert (args.checkpoint, args.model, args.seed) == (Path("/ckpt"), None, None)
    monkeypatch.setenv("MOE_PEER_MODEL", "/hf")  # env beats the file's choice of source
    args = serve("--config", str(cfg))
    assert (args.checkpoint, args.model, args.seed) == (None, "/hf", None)
    args = serve("--config", str(cfg), "--seed", "3")  # and the command line beats both
    assert (args.checkpoint, args.model, args.seed) == (None, None, 3)


@pytest.mark.unit
def test_conflicting_env_vars_are_a_usage_error(monkeypatch, capsys):
    monkeypatch.setenv("MOE_PEER_MODEL", "/hf")
    monkeypatch.setenv("MOE_PEER_SEED", "1")
    with pytest.raises(SystemExit) as e:
        serve()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "MOE_PEER_MODEL and MOE_PEER_SEED are mutually exclusive" in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.unit
@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("max-rows = \n", {}, "invalid TOML"),
        ("max-rowz = 3\n", {}, "unknown option 'max-rowz'"),
        ('[serve]\nprompt = "x"\n', {}, "[serve] unknown option 'prompt'"),
        ('max-rows = "lots"\n', {}, "max-rows in "),
        ('dtype = "float8"\n', {}, "invalid choice 'float8'"),
        ("", {"MOE_PEER_MAX_QUEUE_ROWS": "many"}, "MOE_PEER_MAX_QUEUE_ROWS: invalid int value: 'many'"),
    ],
)
def test_bad_settings_are_clear_usage_errors(tmp_path, monkeypatch, capsys, toml, env, message):
    cfg = write(tmp_path, toml)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        serve("--seed", "0", "--config", str(cfg))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err, err
    assert len(err.strip().splitlines()) == 1, f"one line, no usage block: {err}"


def test_bad_config_file_from_the_real_cli_is_an_error_line_not_a_traceback(tmp_path):
    cfg = write(tmp_path, "[serve\nmax-rows = 1\n")
    for argv, prog in (
        (["-m", "peer", "serve", "--seed", "0", "--config", str(cfg)], "moe-peer"),
        (["-m", "coordinator", "--config", str(tmp_path / "missing.toml"), "bootstrap"], "moe-swarm"),
    ):
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert f"{prog}: error: config file" in proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.mark.unit
def test_help_names_the_environment_variables(capsys):
    with pytest.raises(SystemExit):
        serve("--help")
    out = capsys.readouterr().out
    for var in ("MOE_PEER_MAX_ROWS", "MOE_PEER_INITIAL_PEERS", "MOE_PEER_CONFIG", "MOE_PEER_ANNOUNCE_HOST"):
        assert var in out
    assert "command line > environment > config file > default" in " ".join(out.split())
    with pytest.raises(SystemExit):
        swarm_parser().parse_args(["generate", "--help"])
    assert "MOE_SWARM_TIMEOUT" in capsys.readouterr().out
