"""Files other processes read while this one writes them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: Any, **dumps: Any) -> None:
    """Write JSON so that a reader sees the old file or the new one, never half of one: the
    temporary name carries our pid, so processes writing the same file at once don't collide."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, **dumps))
    os.replace(tmp, path)
