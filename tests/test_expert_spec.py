from __future__ import annotations

import pytest

from protos.expert_spec import parse_expert_spec

pytestmark = pytest.mark.unit  # pure logic: the fast subset


def test_ranges_and_wildcards():
    assert parse_expert_spec("0:0-2,1:*", num_layers=2, num_experts=4) == [
        (0, 0),
        (0, 1),
        (0, 2),
        (1, 0),
        (1, 1),
        (1, 2),
        (1, 3),
    ]
    assert parse_expert_spec("*", 2, 2) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert parse_expert_spec("*:3", 2, 4) == [(0, 3), (1, 3)]
    assert parse_expert_spec("1:2,1:2", 2, 4) == [(1, 2)]


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("0", "LAYERS:EXPERTS"),
        ("0:4", "outside"),
        ("2:0", "outside"),
        ("0:3-1", "reversed: write 1-3"),
        ("0:a", "bad expert"),
        ("", "selects no expert"),
    ],
)
def test_bad_specs_say_why(spec, words):
    with pytest.raises(ValueError, match=words):
        parse_expert_spec(spec, num_layers=2, num_experts=4)
