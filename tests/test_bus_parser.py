"""The bus's connection reads the protocol as nats-py does: its parser hands the client the same
calls for the same bytes however they are split, and a batched read taken the short way
(`Connection.take`) sees each stored message as nats-py's way would."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import nats
import pytest
from nats.errors import ProtocolError
from nats.protocol import parser as stock

from agentbus.bus import Bus, Delivery, _parser
from agentbus.bus._connection import Connection
from agentbus.bus._types import direct_delivery
from agentbus.config import Settings

pytestmark = pytest.mark.skipif(not _parser.FITS, reason="this nats-py's protocol grammar is not the one checked")


class Recorder:
    """What a client is handed by a parser, in order. On the n-th call of any kind, `reset_after`
    resets the parser from inside it (as the client does when it reconnects) and `fail_at` raises."""

    def __init__(self, reset_after: int = 0, fail_at: int = 0) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.reset_after, self.fail_at = reset_after, fail_at
        self.parser: Any = None

    def _called(self, *call: Any) -> None:
        self.calls.append(call)
        if len(self.calls) == self.reset_after:
            self.parser.reset()
        if len(self.calls) == self.fail_at:
            raise RuntimeError(f"the client failed on {call[0]}")

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, hdr: bytes | None) -> None:
        assert type(data) is bytes and (hdr is None or type(hdr) is bytes)
        self._called("msg", sid, subject, reply, data, hdr)

    async def _process_err(self, err: str) -> None:
        self._called("err", err)

    async def _process_ping(self) -> None:
        self._called("ping")

    async def _process_pong(self) -> None:
        self._called("pong")

    async def _process_info(self, info: dict[str, Any]) -> None:
        self._called("info", info)


def _hmsg(subject: str, sid: int, reply: str, headers: bytes, payload: bytes) -> bytes:
    block = b"NATS/1.0\r\n" + headers + b"\r\n"
    head = f"HMSG {subject} {sid} {reply + ' ' if reply else ''}{len(block)} {len(block) + len(payload)}\r\n"
    return head.encode() + block + payload + b"\r\n"


WIRE = b"".join(
    [
        b'INFO {"server_id":"x","max_payload":1048576}\r\n',
        b"+OK\r\n",
        b"MSG a.b 1 5\r\nhello\r\n",
        b"MSG a.b 1 _INBOX.r 0\r\n\r\n",
        b"MSG\ta.b\t2\t\t3\r\nx\r\n\r\n",
        b"PING\r\n",
        _hmsg("c.d", 3, "", b"Nats-Msg-Id: 1\r\n", b"payload with \r\nMSG x 1 3\r\n inside"),
        _hmsg("c.d", 3, "reply.to", b"", b""),
        b"HMSG e 4 20 20\r\nNATS/1.0 204 EOB\r\n\r\n\r\n",
        b"PONG\r\n",
        b"-ERR 'Permissions Violation for Subscription to \"x\"'\r\n",
        b"MSG f 5 " + str(5000).encode() + b"\r\n" + b"z" * 5000 + b"\r\n",
    ]
)


async def _feed(
    parser_cls: type[stock.Parser], chunks: list[Any], reset_after: int = 0, fail_at: int = 0
) -> tuple[Any, ...]:
    """The calls made, the state left, and the error raised (a protocol error ends a connection)."""
    nc = Recorder(reset_after, fail_at)
    ps = parser_cls(nc)
    nc.parser = ps
    failed = None
    try:
        for chunk in chunks:
            await ps.parse(chunk)
    except (ProtocolError, RuntimeError) as err:
        failed = f"{type(err).__name__}: {err}"
    return nc.calls, (bytes(ps.buf), ps.state, ps.needed, ps.header_needed, dict(ps.msg_arg)), failed


async def test_the_parser_hands_over_what_nats_py_s_does_whole_and_in_pieces() -> None:
    whole = [WIRE]
    assert await _feed(_parser.Parser, whole) == await _feed(stock.Parser, whole)
    rng = random.Random(20261130)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(WIRE)), rng.randrange(1, 40)))
        chunks = [WIRE[a:b] for a, b in zip([0, *cuts], [*cuts, len(WIRE)], strict=True)]
        ours, theirs = await _feed(_parser.Parser, chunks), await _feed(stock.Parser, chunks)
        assert ours == theirs, cuts
    one_by_one = [WIRE[i : i + 1] for i in range(len(WIRE))]
    assert await _feed(_parser.Parser, one_by_one) == await _feed(stock.Parser, one_by_one)
    calls, _, failed = await _feed(_parser.Parser, whole)
    assert failed is None and [c[0] for c in calls] == [
        "info", "msg", "msg", "msg", "ping", "msg", "msg", "msg", "pong", "err", "msg"]  # fmt: skip


async def test_a_cut_message_waits_for_its_rest_and_a_reset_voids_what_was_read() -> None:
    half = len(WIRE) // 2
    ours = await _feed(_parser.Parser, [WIRE[:half]])
    assert ours == await _feed(stock.Parser, [WIRE[:half]])
    assert ours[1][0]  # the rest of a cut message is kept for the next read
    for n in range(1, 12):  # the client reconnected while handling each kind of call
        assert await _feed(_parser.Parser, [WIRE], reset_after=n) == await _feed(stock.Parser, [WIRE], reset_after=n)


async def test_a_client_that_fails_on_a_call_leaves_both_parsers_alike() -> None:
    for n in range(1, 12):
        for chunks in ([WIRE], [WIRE[:100], WIRE[100:]]):
            ours = await _feed(_parser.Parser, chunks, fail_at=n)
            assert ours[2] is not None and ours == await _feed(stock.Parser, chunks, fail_at=n)


async def test_bytearray_and_memoryview_reads_give_bytes_payloads() -> None:
    for kind in (bytearray, memoryview):
        chunks = [kind(WIRE[:333]), kind(WIRE[333:])]
        assert await _feed(_parser.Parser, chunks) == await _feed(stock.Parser, [WIRE[:333], WIRE[333:]])


async def test_a_big_payload_read_by_read_is_handed_over_whole() -> None:
    """8 MiB is the server's largest payload; 32 KiB is what nats-py reads at a time."""
    big = b"MSG big 9 " + str(1 << 20).encode() + b"\r\n" + bytes(range(256)) * 4096 + b"\r\nPING\r\n"
    chunks = [big[i : i + 32768] for i in range(0, len(big), 32768)]
    ours = await _feed(_parser.Parser, chunks)
    assert ours == await _feed(stock.Parser, chunks)
    assert [c[0] for c in ours[0]] == ["msg", "ping"] and len(ours[0][0][4]) == 1 << 20


async def test_the_parser_hands_answers_to_take_first_and_the_rest_to_the_client() -> None:
    """`take` is asked only for messages on the quick subscription; what it takes never reaches
    `_process_msg`, what it leaves does, in order."""

    class Taking(Recorder):
        quick_sid = 3

        def take(self, sid: int, subject: bytes, data: bytes, hdr: bytes | None) -> bool:
            assert sid == self.quick_sid
            self.calls.append(("taken" if data else "left", sid, subject, data, hdr))
            return bool(data)

    nc = Taking()
    ps = _parser.Parser(nc)
    nc.parser = ps
    await ps.parse(WIRE)
    kinds = [c[0] for c in nc.calls]
    assert kinds == ["info", "msg", "msg", "msg", "ping", "taken", "left", "msg", "msg", "pong", "err", "msg"]
    assert nc.calls[7][:3] == ("msg", 3, b"c.d")  # left by take: nats-py's way, same arguments


@pytest.mark.parametrize(
    "wire",
    [b"BOGUS line\r\n", b"MSG a.b x 5\r\nhello\r\n", b"HMSG a x 1 2\r\nzz\r\n", b"HMSG a 1 x 9\r\n" + b"x" * 5000],
    ids=["unknown", "sid", "hmsg-sid", "long-unknown"],
)
async def test_a_line_nats_py_refuses_or_waits_on_is_refused_or_waited_on(
    wire: bytes,
) -> None:
    ours = await _feed(_parser.Parser, [wire])
    assert ours == await _feed(stock.Parser, [wire])
    # past 4,096 bytes an unknown line is taken for one not yet whole: both wait for more
    assert (ours[2] is None) == (len(wire) > 4096)


async def test_other_nats_py_clients_keep_nats_py_s_parser(settings: Settings) -> None:
    async with await Bus.connect(settings) as bus:
        assert type(bus._nc) is Connection and type(bus._nc._ps) is _parser.Parser
    assert type(nats.NATS()._ps) is stock.Parser


async def _nats_py_way(bus: Bus, stream: str, subject: str) -> list[Delivery]:
    """The same batched direct get through nats-py's own parsing: a plain subscription."""
    got: list[Delivery] = []
    done = asyncio.get_running_loop().create_future()
    nc = bus._nc
    inbox = nc.new_inbox()

    async def answer(msg: Any) -> None:
        headers = msg.headers or {}
        if "Status" in headers and "Nats-Sequence" not in headers:
            done.set_result(None)
        else:
            got.append(direct_delivery(msg.data, headers))

    sub = await nc.subscribe(inbox, cb=answer)
    await nc.publish(
        f"$JS.API.DIRECT.GET.{stream}",
        json.dumps({"seq": 1, "next_by_subj": subject, "batch": 100}).encode(),
        reply=inbox,
    )
    await asyncio.wait_for(done, 10)
    await sub.unsubscribe()
    return got


async def test_a_batched_read_taken_short_reads_every_message_as_nats_py_s_way_forged_headers_and_all(
    settings: Settings,
) -> None:
    """Publishers may set any header, the server's own names too; the server appends its lines, so
    the last of a name is the server's. The short way reads those four values without parsing the
    block, and the block parsed when asked for is the one nats-py parses."""
    async with await Bus.connect(settings) as bus:
        await bus.provision()
        stream, sid = bus.ns.sessions_stream, "01JPARSERTESTSESSION0000AA"
        subject = bus.ns.session_log(sid)
        forged = [
            {},
            {"Nats-Subject": "elsewhere", "Nats-Sequence": "999", "Nats-Time-Stamp": "1999-01-01T00:00:00Z"},
            {"Nats-Num-Pending": "77", "Status": "204", "Description": "no"},
            # the server's four lines, in the server's order, forged before the server's own
            {
                "Nats-Subject": "x.y",
                "Nats-Sequence": "5",
                "Nats-Time-Stamp": "1999-01-01T00:00:00Z",
                "Nats-Num-Pending": "3",
            },
            {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01", "Name": "v\u00e4lue"},
        ]
        js = bus._nc.jetstream()
        for i, headers in enumerate(forged):
            await js.publish(subject, json.dumps({"i": i}).encode(), headers=headers or None)
        ours = await bus.read_direct(stream, bus.ns.session_all(sid), lambda d: d)
        assert all(isinstance(d._headers, bytes) for d in ours)  # taken the short way, not parsed until asked
        theirs = await _nats_py_way(bus, stream, bus.ns.session_all(sid))
        assert len(ours) == len(theirs) == len(forged)
        for mine, other in zip(ours, theirs, strict=True):
            assert (mine.subject, mine.data, mine.seq, mine.num_pending) == (
                other.subject, other.data, other.seq, other.num_pending)  # fmt: skip
            assert mine.timestamp_ns == other.timestamp_ns > 0
            assert dict(mine.headers) == dict(other.headers)
            assert mine.subject == subject


def test_a_stored_message_s_four_values_are_the_last_of_their_names_however_the_lines_are_laid_out() -> None:
    """`stored_delivery` reads the server's lines in the order nats-server writes them in one
    search; any other layout is read name by name, the last of each winning. Both agree."""
    from agentbus.bus import _types

    server = [b"Nats-Subject: a.b.c", b"Nats-Sequence: 12", b"Nats-Time-Stamp: 2026-11-30T07:21:47.8Z",
              b"Nats-Num-Pending: 4", b"Nats-Last-Sequence: 9"]  # fmt: skip
    forged = [b"Nats-Subject: x.y", b"Nats-Sequence: 99", b"Nats-Num-Pending: 7", b"Nats-Time-Stamp: 1999"]
    layouts = [
        server,
        [b"Nats-Msg-Id: m", b"Nats-Stream: S", *server],
        [*forged, b"Nats-Stream: S", *server],
        [*server[3:], *server[:3]],  # another order: name by name
        [server[0], server[2], server[1], server[3]],
        [b"Nats-Subject:  spaced ", b"Nats-Sequence:12", *server[2:]],
        [b"Nats-Subject: a.b.c", b"Nats-Sequence: 1x", *server[2:]],
        [],
    ]
    for lines in layouts:
        block = b"NATS/1.0\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"
        says = _types._server_says
        sequence, pending = says(block, _types._SEQUENCE), says(block, _types._PENDING)
        expected = (says(block, _types._SUBJECT), None if sequence and not sequence.isdigit() else int(sequence or 0),
                    int(pending or 0), says(block, _types._TIME))  # fmt: skip
        if expected[1] is None:
            with pytest.raises(ValueError):
                _types.stored_delivery(b"data", block)
            continue
        d = _types.stored_delivery(b"data", block)
        assert (d.subject, d.seq, d.num_pending, d._time) == expected, lines


async def test_a_conversion_that_fails_fails_the_read_and_the_connection_reads_on(settings: Settings) -> None:
    async with await Bus.connect(settings) as bus:
        await bus.provision()
        sid = "01JPARSERTESTSESSION0000AB"
        for i in range(5):
            await bus._nc.jetstream().publish(bus.ns.session_log(sid), json.dumps({"i": i}).encode())

        def convert(d: Delivery) -> int:
            if json.loads(d.data)["i"] == 2:
                raise ValueError("cannot use record 2")
            return int(d.seq)

        with pytest.raises(ValueError, match="record 2"):
            await bus.read_direct(bus.ns.sessions_stream, bus.ns.session_all(sid), convert)
        seqs = await bus.read_direct(bus.ns.sessions_stream, bus.ns.session_all(sid), lambda d: d.seq)
        assert len(seqs) == 5 and seqs == sorted(seqs)


def test_a_work_item_s_sequence_attempt_and_time_are_what_nats_py_reads_from_its_ack_subject() -> None:
    """`Job` reads three numbers from the ack subject itself (nats-py's `metadata` builds
    dataclasses and datetimes for them): the same numbers for both layouts the server uses, and
    nats-py's own error for a subject that is not one."""
    from nats.aio.msg import Msg
    from nats.errors import Error as NatsError

    from agentbus.bus._queues import Job

    stamp = 1_796_083_440_217_166_387
    replies = [
        f"$JS.ACK.AGENTBUS_WORK.pool-a.3.1207.88.{stamp}.5",  # v1
        f"$JS.ACK.hub.ACCHASH.AGENTBUS_WORK.pool-a.1.42.7.{stamp}.0.r4nd0m",  # v2
        f"$JS.ACK._.ACCHASH.AGENTBUS_WORK.pool-a.2.43.8.{stamp}.9",  # v2 without its last token
        "$JS.ACK.AGENTBUS_WORK.pool-a.1.1.1.0.0",  # no time
    ]
    for reply in replies:
        msg = Msg(_client=None, subject="agentbus.work.pool-a", reply=reply, data=b"{}")  # type: ignore[arg-type]
        job, meta = Job(msg), msg.metadata
        assert (job.seq, job.attempt) == (meta.sequence.stream, meta.num_delivered), reply
        assert job.stored_at == pytest.approx(meta.timestamp.timestamp(), abs=1e-6), reply
    for reply in ["", "$JS.ACK.S.c.1.2", "_INBOX.abc", "$JS.ACK.S.c.x.2.3.4.5"]:
        msg = Msg(_client=None, subject="agentbus.work.pool-a", reply=reply, data=b"{}")  # type: ignore[arg-type]
        with pytest.raises((NatsError, ValueError)):
            msg.metadata  # noqa: B018
        with pytest.raises((NatsError, ValueError)):
            Job(msg)


async def test_a_listener_s_skipped_messages_are_dropped_off_the_connection_and_counted(settings: Settings) -> None:
    """`listen(skip=...)`: what it skips never becomes a message (the read loop drops it, counted
    as nats-py counts what it delivers), the rest arrive in order, and a skip that raises delivers.
    A connection without the quick parser skips the same messages in the listener."""
    async with await Bus.connect(settings) as bus, await Bus.connect(settings) as sender:
        made = await _listened(bus, sender, "01JPARSERSKIP1")
        assert made == [b"one", b"boom", b"two", b"last"]  # the skipped ones never became messages
        bus._nc._ps = stock.Parser(bus._nc)  # type: ignore[attr-defined]  # nats-py's own parser
        made = await _listened(bus, sender, "01JPARSERSKIP0")
        assert made == [b"one", b"skip-1", b"boom", b"skip-2", b"two", b"last"]


async def _listened(bus: Bus, sender: Bus, sid: str) -> list[bytes]:
    """Six messages to a listener that skips two (and fails on one): what became a nats-py message."""
    subject = f"{bus.ns.session_log(sid).removesuffix('.log')}.input.{sender.identity.user}"
    skipped: list[bytes] = []

    def skip(subject: bytes, data: bytes) -> bool:
        if data == b"boom":
            raise ValueError("a payload the check cannot read")
        if data.startswith(b"skip"):
            skipped.append(subject)
            return True
        return False

    heard: list[bytes] = []
    ready = asyncio.Event()

    async def listen() -> None:
        async for _, data in bus.listen(bus.ns.sessions_people_all(), ready=ready, skip=skip):
            heard.append(data)
            if data == b"last":
                return

    listening = asyncio.create_task(listen())
    await asyncio.wait_for(ready.wait(), 5)
    before = bus._nc.stats["in_msgs"]
    made: list[bytes] = []
    process = bus._nc._process_msg

    async def counted(sid: int, subject: bytes, reply: bytes, data: bytes, headers: Any) -> None:
        made.append(data)
        await process(sid, subject, reply, data, headers)

    bus._nc._process_msg = counted  # type: ignore[method-assign]
    try:
        for data in (b"one", b"skip-1", b"boom", b"skip-2", b"two", b"last"):
            await sender._nc.publish(subject, data)
        await sender._nc.flush()
        await asyncio.wait_for(listening, 5)
    finally:
        bus._nc._process_msg = process  # type: ignore[method-assign]
    assert heard == [b"one", b"boom", b"two", b"last"]
    assert skipped == [subject.encode()] * 2
    assert bus._nc.stats["in_msgs"] - before == 6
    assert not bus._nc.skips  # the listener is gone, and its check with it
    return made


def test_only_a_session_s_creation_and_route_on_its_control_channel_are_no_signal() -> None:
    """What every agent hears of every session and drops unread (`AgentWorker._hear_people`)."""
    from agentbus.messages import CancelRequested, HumanMessage, Routed, SessionCreated, Task, encode
    from services.agent.worker import submission

    created = encode(SessionCreated(id="created", task=Task(session_id="s1", prompt="p")))
    routed = encode(Routed(id="routed", pool="p"))
    cancel = encode(CancelRequested(id="c", author="a"))
    said = encode(HumanMessage(id="h", text="session_created", author="a"))
    assert submission(b"ab.session.s1.control.alice", created)
    assert submission(b"ab.session.s1.control.router-1", routed)
    assert not submission(b"ab.session.s1.control.alice", cancel)
    assert not submission(b"ab.session.s1.input.alice", created)  # not where a creation belongs: a signal
    assert not submission(b"ab.session.s1.input.alice", said)
    assert not submission(b"ab.session.control.input.alice", created)  # a session named "control"
    assert not submission(b"ab.session.s1.control.alice", b"not json")
    assert not submission(b"ab.session.s1.control.alice", b'{"type": 1}')
    assert not submission(b"elsewhere", created)
