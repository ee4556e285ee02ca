"""The bus's connection: nats-py's client with the quick parsers, and a short way for the answers
to a batched read.

nats-py turns each message it reads into a `Msg` (its subject and reply decoded, its headers
parsed through two coroutines, its subscription's flow-control bookkeeping) before it reaches a
subscriber. A batched direct get answers with a thousand stored messages, and every one went
that way only to be taken apart again. Here the parser hands each answer on the replies
subscription to `take` first: a stored message for a batched read (a header block and no status
line) goes straight to its `Collected`, counted as nats-py counts it; everything else takes
nats-py's way unchanged. Only this class changes: other nats-py clients in the process are left
as they are.
"""

from __future__ import annotations

from collections.abc import Callable

from nats.aio import client as nats_client
from nats.aio.client import Client

from agentbus.bus import _headers, _parser
from agentbus.bus._replies import Collected, Replies

_STORED = b"NATS/1.0\r\n"  # a header block with no status on its first line
_SEQUENCE = b"\r\nNats-Sequence:"  # what a direct get adds to a stored message
# The short way reads header blocks as nats-py 2.16 does (its parser, not fast_mail_parser's), and
# keeps its counters as that version's `_process_msg` does: any other nats-py goes its own way.
_SHORT = _headers.FITS and _parser.FITS and getattr(nats_client, "parse_email", None) is None


class Connection(Client):
    def __init__(self) -> None:
        super().__init__()
        if _parser.FITS:
            self._ps = _parser.Parser(self)
        self.quick_sid = -1  # the replies subscription's id, once `answer_into` named it
        self._answers: Replies | None = None
        # per subscription id: messages for which this says True are counted and dropped in the
        # read loop, before nats-py makes them a `Msg` (`Reading.listen`'s `skip`)
        self.skips: dict[int, Callable[[bytes, bytes], bool]] = {}

    if _headers.FITS:
        _parse_header_lines = staticmethod(_headers.parse_header_lines)

    def answer_into(self, sid: int, replies: Replies) -> None:
        """Stored messages on subscription `sid` for one of `replies`' batched reads go to it directly."""
        self._answers, self.quick_sid = replies, sid

    def skipped(self, sid: int, subject: bytes, data: bytes) -> bool:
        """Whether a message on subscription `sid` is one its listener skips: if so, counted as
        nats-py counts what it delivers, and dropped. What the check raises delivers it."""
        skip, sub = self.skips.get(sid), self._subs.get(sid)
        if skip is None or sub is None or sub._jsi is not None or sub._max_msgs > 0:
            return False
        try:
            if not skip(subject, data):
                return False
        except Exception:
            return False
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)
        sub._received += 1
        return True

    def take(self, sid: int, subject: bytes, data: bytes, headers: bytes | None) -> bool:
        """Hand a message the parser read straight to its batched read; False: nats-py's way."""
        if headers is None or not headers.startswith(_STORED) or _SEQUENCE not in headers or not _SHORT:
            return False  # no header block, a status, not a stored message, or not the nats-py checked
        answers, sub = self._answers, self._subs.get(sid)
        if answers is None or sub is None or sub._jsi is not None or sub._max_msgs > 0:
            return False
        if sub._future is not answers:  # type: ignore[comparison-overlap]  # subscribed with future=answers
            return False
        waiter = answers.waiting.get(subject.decode())
        if type(waiter) is not Collected:
            return False
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)
        sub._received += 1
        waiter.add_block(data, headers)
        return True
