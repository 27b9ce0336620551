"""Redis replies as the tests read them. redis-py types a reply for any client and for every command that
shares its shape: a string is bytes or str, and XRANGE's reply may be nil, as may an entry's id and fields
(XCLAIM's deleted entries). A range over a stream has none of those nils, and a client made with
decode_responses=True gives str alone. These check that, and say it to mypy."""

from __future__ import annotations

from redis.typing import StreamRangeResponse

Fields = dict[bytes | str, bytes | str]


def decoded(reply: object) -> str:
    """A string reply from a client made with decode_responses=True."""
    assert isinstance(reply, str), reply
    return reply


def entries(reply: StreamRangeResponse | None) -> list[tuple[bytes | str, Fields]]:
    """An XRANGE or XREVRANGE reply's (id, fields) pairs, from either kind of client."""
    assert reply is not None
    pairs = []
    for entry_id, fields in reply:
        assert entry_id is not None and fields is not None
        pairs.append((entry_id, fields))
    return pairs


def decoded_entries(reply: StreamRangeResponse | None) -> list[tuple[str, dict[str, str]]]:
    """The same from a client made with decode_responses=True: every id, field and value a str."""
    return [
        (decoded(entry_id), {decoded(name): decoded(value) for name, value in fields.items()})
        for entry_id, fields in entries(reply)
    ]
