"""The committed gRPC stubs are exactly what protoc generates from the committed .proto."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ["expert_service_pb2.py", "expert_service_pb2.pyi", "expert_service_pb2_grpc.py"]


def test_stubs_match_proto(tmp_path):
    (tmp_path / "protos").mkdir()
    shutil.copy(ROOT / "protos" / "expert_service.proto", tmp_path / "protos")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I.",
            "--python_out=.",
            "--pyi_out=.",
            "--grpc_python_out=.",
            "protos/expert_service.proto",
        ],
        cwd=tmp_path,
        check=True,
    )
    stale = [
        name for name in GENERATED if (tmp_path / "protos" / name).read_bytes() != (ROOT / "protos" / name).read_bytes()
    ]
    assert not stale, f"regenerate with `make protos`: {stale} differ from protos/expert_service.proto"
