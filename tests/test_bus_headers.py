"""The quick header parser the bus installs over nats-py's agrees with it on every input."""

from __future__ import annotations

import random

import pytest
from nats.aio.client import Client

from agentbus.bus import _headers

ORIGINAL = _headers.ORIGINAL
pytestmark = pytest.mark.skipif(
    not _headers.FITS, reason="this nats-py's header parser is not the one the quick parser replaces"
)

SHAPES = [
    b"",
    b"\r\n",
    b"Nats-Msg-Id: abc\r\n\r\n",
    b"Nats-Stream: S\r\nNats-Subject: a.b.c\r\nNats-Sequence: 12\r\nNats-Time-Stamp: 2026-11-30T07:21:47.8Z\r\n\r\n",
    b"NoColon\r\nName:Value\r\nName:\tTabbed\r\n",
    b"Bad Name: x\r\nBad\tName: y\r\n Leading: z\r\nTrailing : w\r\n",
    b"\x1cSep: a\r\nSep\x1f: b\r\nVT\x0bx: c\r\n",
    b"N\xc3\xa4me: non-ascii name\r\nName: v\xc3\xa4lue\r\nName2: \xff\xfe bad utf-8\r\n",
    b"Dup: 1\r\nDup: 2\r\n",
    b": empty name\r\nEmpty:\r\n",
    b"Colon: a: b: c\r\n",
    b"Lone\rCR: x\r\nLone\nLF: y\r\n",
]


@pytest.mark.parametrize("raw", SHAPES, ids=range(len(SHAPES)))
def test_the_quick_parser_reads_each_shape_as_nats_py_does(raw: bytes) -> None:
    assert _headers.parse_header_lines(raw) == ORIGINAL.__func__(raw)


def test_the_quick_parser_reads_random_header_blocks_as_nats_py_does() -> None:
    rng = random.Random(20261130)
    alphabet = b"ab:- \t\r\n\x0b\x0c\x1c\x1d\x1e\x1f\x7f\x80\xc3\xa4\xff"
    for _ in range(20_000):
        raw = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        assert _headers.parse_header_lines(raw) == ORIGINAL.__func__(raw), raw


def test_the_bus_connection_parses_with_the_quick_parser_and_leaves_nats_py_as_it_is() -> None:
    """Only the bus's own connections change: another nats-py client in the process keeps its parser."""
    from agentbus.bus._connection import Connection

    assert Connection._parse_header_lines is _headers.parse_header_lines
    assert Client.__dict__["_parse_header_lines"] is ORIGINAL


def test_names_kept_as_plain_stay_few_and_short_and_change_no_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name read plain once is kept, so the next block skips its checks; the same name with
    whitespace or outside ASCII is still read as nats-py reads it; names a publisher invents fill the
    set only up to its bound, and a long one is never kept."""
    plain: set[str] = set()
    monkeypatch.setattr(_headers, "_PLAIN", plain)
    for raw in (b"Nats-Msg-Id: a\r\n", b" Nats-Msg-Id : b\r\n", b"Nats-Msg-Id: \xc3\xa4\r\n", b"Nats-Msg-Id\t: c\r\n"):
        assert _headers.parse_header_lines(raw) == ORIGINAL.__func__(raw), raw
        assert plain == {"Nats-Msg-Id"}
    long = b"N" * (_headers._PLAIN_LONGEST + 1)
    assert _headers.parse_header_lines(long + b": v\r\n") == {long.decode(): "v"}
    assert long.decode() not in plain
    for i in range(_headers._PLAIN_KEPT * 2):
        raw = f"Invented-{i}: v\r\n".encode()
        assert _headers.parse_header_lines(raw) == ORIGINAL.__func__(raw)
    assert len(plain) == _headers._PLAIN_KEPT
