"""What `generate` says when the swarm serves other weights than the user's checkpoint."""

from __future__ import annotations

import pytest

from coordinator.commands.generate import MAX_MODELS_NAMED, name_models

pytestmark = pytest.mark.unit


def test_the_most_served_models_are_named_first_and_the_line_stays_short():
    served = {f"mixtral-{i:016x}": i for i in range(1, 8)}  # 7 models, served by 1..7 peers
    line = name_models(served)
    assert line.startswith("mixtral-0000000000000007 (7 peers), mixtral-0000000000000006 (6 peers)")
    assert line.count("(") == MAX_MODELS_NAMED and line.endswith(" and 2 more")
    assert name_models({"olmoe-00000000000000aa": 1}) == "olmoe-00000000000000aa (1 peer)"
