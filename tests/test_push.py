"""PushHeader: the one definition of what a push carries, from the worker's side to the
server's and back."""

from __future__ import annotations

import math
from dataclasses import fields, replace
from typing import Any

import pytest

from pslm.errors import ConfigError, ProtocolError, RefusedError
from pslm.ps.core.push import PushHeader, PushPart, check_codecs
from pslm.wire.message import Message, decode, encode

FULL = PushHeader(
    worker=1,
    share=0,
    clock=7,
    weight=3.0,
    reply_params=True,
    codec="int8",
    pull_codec="bf16",
    scalars={"loss": 2.5, "min.ctl": 1.0},
    sq_norm=4.0,
    keys=[3, 4, 9],
    runs=[2, 1],
    row_keys=[12],
    seq=2,
    final=False,
    priority=5,
    shm="pslm-w1-0",
)


def _wire(head: PushHeader) -> Message:
    """The header as a server receives it: encoded, sent, decoded."""
    frames = encode(Message("push", id=1, body=head.to_body()))
    return decode([bytes(f) for f in frames])


def test_every_field_survives_the_wire() -> None:
    assert {f.name for f in fields(PushHeader)} == set(FULL.to_body())  # none left out
    assert PushHeader.decode(_wire(FULL), num_workers=2) == FULL


def test_a_plain_push_carries_only_what_differs_from_the_defaults() -> None:
    plain = PushHeader(worker=0, share=0, clock=0)
    assert set(plain.to_body()) == {
        "worker",
        "share",
        "clock",
        "weight",
        "reply_params",
        "codec",
        "pull_codec",
    }
    assert PushHeader.decode(_wire(plain), num_workers=1) == plain
    # an empty key list is not "all chunks": it travels
    none_here = replace(plain, keys=[], runs=[])
    assert PushHeader.decode(_wire(none_here), num_workers=1).keys == []


def test_a_part_takes_the_parts_fields() -> None:
    part = PushPart(keys=[1, 2], runs=[2], seq=3, final=False, priority=4)
    head = PushHeader(worker=0, share=0, clock=5).with_part(part)
    assert (head.keys, head.runs, head.seq, head.final, head.priority) == tuple(part)
    assert head.clock == 5


def test_the_share_defaults_to_the_workers_own() -> None:
    msg = Message("push", id=1, body={"worker": 1, "clock": 0})
    assert PushHeader.decode(msg, num_workers=2).share == 1


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"worker": 2}, ProtocolError, "worker 2 is not in"),
        ({"share": -1}, ProtocolError, "share -1 is not in"),
        ({"clock": None}, ProtocolError, "field 'clock'"),
        ({"weight": 0.0}, ProtocolError, "weight must be in"),
        ({"weight": math.inf}, ProtocolError, "weight must be in"),
        ({"weight": math.nan}, ProtocolError, "weight must be in"),
        ({"weight": 1e39}, ProtocolError, "weight must be in"),  # finite, above float32's range
        ({"weight": True}, ProtocolError, "must not be a boolean"),
        ({"pull_codec": "int8"}, RefusedError, "pulls take"),
        ({"codec": "zip"}, ConfigError, "unknown codec"),
        ({"sq_norm": math.nan}, ProtocolError, "sq_norm must be >= 0"),
        ({"sq_norm": -1.0}, ProtocolError, "sq_norm must be >= 0"),
        ({"scalars": {"loss": "low"}}, ProtocolError, "not a number"),
        ({"scalars": {"min.ctl_known": math.nan}}, ProtocolError, "not finite"),
        ({"scalars": {"loss": -math.inf}}, ProtocolError, "not finite"),
        ({"keys": 3}, ProtocolError, "field 'keys'"),
        ({"final": 1}, ProtocolError, "field 'final'"),
        ({"shm": 5}, ProtocolError, "field 'shm'"),
    ],
)
def test_a_bad_field_is_refused_by_name(
    change: dict[str, Any], error: type[Exception], match: str
) -> None:
    body = {**FULL.to_body(), **change}
    with pytest.raises(error, match=match):
        PushHeader.decode(Message("push", id=1, body=body), num_workers=2)


def test_codecs_are_checked_for_the_config() -> None:
    assert check_codecs("topk:0.1", "fp16") == "topk:0.1"
    with pytest.raises(ConfigError, match="pulls take"):
        check_codecs("none", "int8")
    with pytest.raises(ConfigError, match="unknown codec"):
        check_codecs("zip", "none")
