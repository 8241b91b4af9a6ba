"""docs/benchmarks.md's commands run what exists: every `moe-swarm bench` line parses, every
`python -m coordinator.bench.<tool>` names a tool whose parser takes the line, and nothing
points at the old top-level bench/ folder."""

from __future__ import annotations

import importlib
import os
import re
import shlex
from pathlib import Path

import pytest

from coordinator.cli import build_parser as swarm_parser

pytestmark = pytest.mark.unit  # pure logic: the fast subset

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
TOOL = "coordinator.bench."
# the volunteer's own tools and the weights fetcher are documented beside the benchmarks
MODULES = (TOOL, "peer.tools.", "protos.weights")


def command_lines(text: str) -> list[list[str]]:
    """argv of each line in the fenced shell blocks (continuations joined, comments cut)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if line.strip().startswith(("moe-swarm", "python -m")):
                out.append(shlex.split(line, comments=True))
    return out


def test_every_benchmark_has_a_section_with_its_command():
    text = DOC.read_text()
    for name in ("layer", "generate", "straggler", "saturation", "security", "api"):
        assert re.search(rf"^moe-swarm bench {name}\b|= moe-swarm bench {name}\b", text, re.M), name


def test_moe_swarm_bench_lines_parse(monkeypatch):
    for var in [v for v in os.environ if v.startswith("MOE_")]:
        monkeypatch.delenv(var)
    lines = [argv for argv in command_lines(DOC.read_text()) if argv[0] == "moe-swarm"]
    assert lines
    for argv in lines:
        swarm_parser().parse_args(argv[1:])


def test_tool_lines_name_tools_that_take_them():
    lines = [argv for argv in command_lines(DOC.read_text()) if argv[:2] == ["python", "-m"]]
    assert {argv[2] for argv in lines} >= {TOOL + "ab_layer", TOOL + "primitives", TOOL + "scale_costs"}
    for argv in lines:
        assert argv[2].startswith(MODULES), argv
        module = importlib.import_module(argv[2])
        if not hasattr(module, "build_parser"):  # a package run as `python -m`
            module = importlib.import_module(argv[2] + ".__main__")
        module.build_parser().parse_args(argv[3:])


def test_make_bench_layer_runs_the_documented_command():
    makefile = (ROOT / "Makefile").read_text()
    (recipe,) = re.findall(r"^bench-layer:.*\n\t\$\(BIN\)/(.*)$", makefile, re.M)
    assert f"make bench-layer   # = {recipe}" in DOC.read_text()


def test_gpu_check_runs_existing_tools_and_tests():
    script = (ROOT / "coordinator" / "bench" / "gpu_check.sh").read_text()
    for module in re.findall(r"-m ((?:coordinator\.bench|peer\.tools)\.\w+)", script):
        importlib.import_module(module)
    for test in re.findall(r"tests/\w+\.py", script):
        assert (ROOT / test).is_file(), test


@pytest.mark.parametrize("path", ["README.md", "docs", "tests", "coordinator", "Makefile"])
def test_nothing_points_at_the_old_bench_folder(path):
    files = [ROOT / path] if (ROOT / path).is_file() else sorted((ROOT / path).rglob("*.*"))
    for f in files:
        if f.suffix in (".md", ".py", ".sh", "") and f.is_file():
            hits = re.findall(r"(?<![\w/.])bench/\w+\.(?:py|sh)", f.read_text())
            assert not hits, f"{f.relative_to(ROOT)}: {hits}"
