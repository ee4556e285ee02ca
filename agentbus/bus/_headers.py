"""nats-py's header parser, the same rules at a third of the cost.

Every message with headers goes through `Client._parse_header_lines`: each stored record read back
(a direct get answers with six headers) and each work item. nats-py 2.16 tests each header name
for whitespace with a generator over its characters, which costs as much as the rest of the parse;
one regular expression does the same test. The bus's connections use it in place of nats-py's,
and only where nats-py's is the parser it was checked against (`tests/test_bus_headers.py` compares
the two on every shape of input); other nats-py clients in the process keep theirs.
"""

from __future__ import annotations

import re

from nats.aio.client import Client

# the ASCII characters str.isspace() is true for (a name that decodes as ASCII has no others)
_SPACE = re.compile(r"[\x09-\x0d\x1c-\x20]")
_STRIP = " \t\n\r\x0b\x0c"  # what bytes.strip() strips: str.strip() would strip \x1c-\x1f as well
_CRLF = b"\r\n"
_CHECKED = "Parse a NATS message-header block"  # the opening of the docstring of the parser replaced
# Header names seen with nothing to strip or refuse: a stored record comes back with the same seven,
# so the tests are skipped for them. Bounded in number and length, so what a hostile publisher
# invents (a name may be megabytes long) is neither kept for long nor in bulk.
_PLAIN: set[str] = set()
_PLAIN_KEPT = 512
_PLAIN_LONGEST = 64


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """`Name: Value` lines to a dict, skipping what nats-py 2.16 skips (no colon, a name that is
    not ASCII or holds whitespace); values are stripped and decoded as UTF-8 with replacement.

    Nearly every block is ASCII: it is decoded once and split as text."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return _parse_bytes(raw)
    out: dict[str, str] = {}
    plain = _PLAIN
    for line in text.split("\r\n"):
        name, sep, value = line.partition(":")
        if not sep:
            continue
        if name not in plain:
            key = name.strip(_STRIP)
            if _SPACE.search(key):
                continue
            if key == name and len(name) <= _PLAIN_LONGEST and len(plain) < _PLAIN_KEPT:
                plain.add(name)
            name = key
        out[name] = value.strip(_STRIP)
    return out


def _parse_bytes(raw: bytes) -> dict[str, str]:
    """The same, line by line as bytes, for a block with bytes outside ASCII."""
    out: dict[str, str] = {}
    for line in raw.split(_CRLF):
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        try:
            key = name.strip().decode("ascii")
        except UnicodeDecodeError:
            continue
        if _SPACE.search(key):
            continue
        out[key] = value.strip().decode("utf-8", "replace")
    return out


ORIGINAL = Client.__dict__.get("_parse_header_lines")
# the quick parser stands in only for the parser it was checked against (the bus's connections use it)
FITS = isinstance(ORIGINAL, staticmethod) and (ORIGINAL.__func__.__doc__ or "").startswith(_CHECKED)
# what parses a block a batched read took the short way (`Connection.take`, only where FITS)
parse = parse_header_lines
