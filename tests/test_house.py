"""The shape of the tree: the import arrows, and modules and functions a reader can take in."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("protos", "peer", "coordinator")
# what each package may import of ours: peer -> protos <- coordinator
ALLOWED = {"protos": {"protos"}, "peer": {"protos", "peer"}, "coordinator": {"protos", "coordinator"}}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
GENERATED = ("_pb2.py", "_pb2_grpc.py")


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if not p.name.endswith(GENERATED))


def _declarative_parser(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """argparse builders are long lists of add_argument calls: exempt, as long as that is all they are."""
    return node.name == "build_parser" or (node.name.startswith("add_") and node.name.endswith("_args"))


def test_imports_follow_the_arrows() -> None:
    wrong = []
    for path in _sources():
        pkg = path.relative_to(ROOT).parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in PACKAGES and top not in ALLOWED[pkg]:
                    wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_modules_and_functions_stay_readable() -> None:
    long = []
    for path in _sources():
        text = path.read_text()
        rel = path.relative_to(ROOT)
        if (n := len(text.splitlines())) > MAX_MODULE_LINES:
            long.append(f"{rel}: {n} lines")
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or _declarative_parser(node):
                continue
            if (n := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                long.append(f"{rel}:{node.lineno} {node.name}(): {n} lines")
    assert not long, "\n".join(long)
