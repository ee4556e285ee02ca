"""The opening a routed work item carries: a fresh session's first two records, signed, so the agent
that takes it starts without reading the session back (subjects.md, "The opening").

Reading a fresh session was a fifth of the work of a one-step session: a request, and a batch of
answers the server and the agent both handle, for two records the router had just read and written.

Trust does not come from the queue: operators may publish work items too. It comes from the MAC,
under a key in the deployment's keys bucket that only services and agents may read, which are the
roles that may write any session's log anyway. Completeness comes from fences: the router records
the route fenced on the whole session at the creation's sequence (nothing in between), and the
agent claims fenced on the whole session at the route's (nothing since). Anything else, a forged
or stale opening, a person's message, a redelivery, and the agent reads the log as it always did.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import time

import msgspec

from agentbus.bus import Bus, Delivery
from agentbus.messages import Opening, Record, Routed
from agentbus.session import record_of
from agentbus.subjects import parse_session_subject

logger = logging.getLogger("agentbus.openings")

KEY = "work"  # the key's name in the keys bucket
_DOMAIN = b"agentbus opening 1\n"  # what the MAC is of, so the key signs nothing else by accident
# How long an agent believes a MAC that does not verify under its key, before asking for the key
# again (it may have been replaced); and that there is no key: an opening says there is one, and an
# agent that started before the first router made it must not go on reading for long.
_RETRY_S = 5.0
_MISSING_RETRY_S = 0.2
# Only a task this small rides in the work item: the work stream allows what the sessions stream
# does, a work item with a near-limit task in it would not fit, and a cancel reads every queued item.
MAX_CREATED_BYTES = 64 * 1024
_HEX = frozenset("0123456789abcdef")


class _Stamped(msgspec.Struct):
    ts: float | None = None


_stamped = msgspec.json.Decoder(_Stamped)


def signed(key: bytes, session_id: str, created_seq: int, sender: str, created: bytes, routed_seq: int,
           routed: bytes) -> str:  # fmt: skip
    """The MAC of an opening (subjects.md gives the same recipe to clients in other languages)."""
    head = f"{session_id}\n{created_seq}\n{sender}\n{routed_seq}\n{len(created)}\n".encode()
    return hmac.new(key, _DOMAIN + head + created + routed, hashlib.sha256).hexdigest()


class WorkKey:
    """The deployment's work key, read once and kept. `make`: a service makes it when there is none
    (the first to start wins; the others read the winner's)."""

    def __init__(self, bus: Bus, *, make: bool = False) -> None:
        self.bus = bus
        self.make = make
        self._key: bytes | None = None
        self._asked = float("-inf")  # when the bucket was last asked (monotonic)
        self._warned = False

    async def get(self, *, again: bool = False) -> bytes | None:
        """The key, or None when there is none (yet). `again`: ask the bucket once more, unless it was
        asked moments ago (a MAC that does not verify: the key may have been replaced)."""
        if self._key is not None and not again:
            return self._key
        if time.monotonic() - self._asked < (_MISSING_RETRY_S if self._key is None else _RETRY_S):
            return self._key
        self._asked = time.monotonic()
        bucket = self.bus.ns.keys_bucket
        try:
            found = await self.bus.kv_get(bucket, KEY)
            if found is None and self.make:
                made = base64.urlsafe_b64encode(secrets.token_bytes(32))
                await self.bus.kv_put_if(bucket, KEY, made, None)  # lost to another router: read theirs
                found = await self.bus.kv_get(bucket, KEY)
        except Exception as err:  # a bucket not there yet, a refusal: work items go without openings
            log = logger.debug if self._warned else logger.warning
            self._warned = True
            log("the work key cannot be read (%s); sessions are read instead of opened from their work item", err)
            return self._key
        try:
            key = base64.urlsafe_b64decode(found[0]) if found and found[0] else None
        except ValueError:  # binascii.Error: only a service or an admin can have written it
            key = None
        if key is not None and len(key) < 32:
            key = None
        if key is None and found:
            logger.warning("the work key in %s is not 32 bytes of base64; delete it and restart a router", bucket)
        self._key = key
        return self._key


async def sign(key: WorkKey, session_id: str, created: Delivery, routed: Routed, routed_bytes: bytes,
               routed_seq: int) -> Opening | None:  # fmt: skip
    """The opening of a session whose creation is `created` and whose route was just recorded at
    `routed_seq` right after it, or None: no key; a creation that is not on a person's control
    channel, has no `ts` of its own (its time would be the stream's, which the opening does not
    carry), is not stored as compact JSON (an embedded payload loses surrounding whitespace), or
    is larger than `MAX_CREATED_BYTES`."""
    _, channel, sender = parse_session_subject(created.subject) or ("", "", "")
    data = created.data
    if channel != "control" or not sender or len(data) > MAX_CREATED_BYTES or data != data.strip():
        return None
    if not _has_ts(data):
        return None
    secret = await key.get()
    if secret is None:
        return None
    mac = signed(secret, session_id, created.seq, sender, created.data, routed_seq, routed_bytes)
    return Opening(created_seq=created.seq, sender=sender, created=msgspec.Raw(created.data),
                   routed_seq=routed_seq, routed=msgspec.Raw(routed_bytes), mac=mac)  # fmt: skip


def _has_ts(data: bytes) -> bool:
    try:
        return _stamped.decode(data).ts is not None
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
        return False


async def opened(key: WorkKey, bus: Bus, session_id: str, opening: Opening) -> list[Record] | None:
    """The records `opening` stands for, exactly as a read of the stream gives them, or None when
    its MAC does not verify under the work key (forged, or signed with a key since replaced)."""
    created, routed = bytes(opening.created), bytes(opening.routed)
    if len(opening.mac) != 64 or not _HEX.issuperset(opening.mac) or not _has_ts(created):
        return None  # not what a router signs: no MAC of ours, or a time the opening cannot carry

    async def verifies(*, again: bool) -> bool:
        secret = await key.get(again=again)
        if secret is None:
            return False
        mac = signed(secret, session_id, opening.created_seq, opening.sender, created, opening.routed_seq, routed)
        return hmac.compare_digest(mac.encode(), opening.mac.encode())

    if not await verifies(again=False) and not await verifies(again=True):
        logger.info("session %s: its work item's opening does not verify; reading the session", session_id)
        return None
    ns = bus.ns
    try:
        control = ns.session_control(session_id, opening.sender)
    except ValueError:  # signed, so the router read it from a subject: never, but not worth a crash
        return None
    return [
        record_of(Delivery(control, created, b"", opening.created_seq, 0, 0)),
        record_of(Delivery(ns.session_log(session_id), routed, b"", opening.routed_seq, 0, 0)),
    ]
