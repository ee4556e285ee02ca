"""nats-py's protocol parser, the same grammar read in place.

nats-py's `Parser.parse` cuts every message out of the front of its buffer (a resize per
message), tries the `MSG` pattern before the `HMSG` one, and copies each payload twice. A batched
direct get of a thousand records arrives as a thousand messages in a few reads; so does a busy
agent's traffic. This one reads each received chunk at an offset, picks the pattern by the first
byte, cuts the buffer once per chunk and copies each payload once (a payload split between reads
is gathered, then copied twice). Messages, errors, pings,
pongs and INFO reach the client exactly as from nats-py's parser, in the same order, with the
same arguments (`tests/test_bus_parser.py` feeds both the same bytes, whole and in pieces),
except messages the connection takes itself first (`Connection.take`, `Connection.skipped`).

It is given only to the bus's own connections, and only over the grammar it was checked against.
"""

from __future__ import annotations

import json
import re
from typing import Any

from nats.errors import ProtocolError
from nats.protocol import parser as stock

# nats-py 2.9 to 2.16 read the protocol with these; another grammar keeps its own parser
_CHECKED = {
    "MSG_RE": b"\\AMSG\\s+([^\\s]+)\\s+([^\\s]+)\\s+(([^\\s]+)[^\\S\r\n]+)?(\\d+)\r\n",
    "HMSG_RE": b"\\AHMSG\\s+([^\\s]+)\\s+([^\\s]+)\\s+(([^\\s]+)[^\\S\r\n]+)?([\\d]+)\\s+(\\d+)\r\n",
    "OK_RE": b"\\A\\+OK\\s*\r\n",
    "ERR_RE": b"\\A-ERR\\s+('.+')?\r\n",
    "PING_RE": b"\\APING\\s*\r\n",
    "PONG_RE": b"\\APONG\\s*\r\n",
    "INFO_RE": b"\\AINFO\\s+([^\r\n]+)\r\n",
}
FITS = all(getattr(getattr(stock, name, None), "pattern", None) == p for name, p in _CHECKED.items()) and (
    stock.AWAITING_CONTROL_LINE,
    stock.AWAITING_MSG_PAYLOAD,
    stock.MAX_CONTROL_LINE_SIZE,
) == (1, 2, 4096)


def _at(name: str) -> re.Pattern[bytes]:
    """The stock pattern anchored where `match(data, pos)` starts instead of at the buffer's start."""
    return re.compile(_CHECKED[name].removeprefix(b"\\A"))


_MSG, _HMSG, _OK, _ERR = _at("MSG_RE"), _at("HMSG_RE"), _at("OK_RE"), _at("ERR_RE")
_PING, _PONG, _INFO = _at("PING_RE"), _at("PONG_RE"), _at("INFO_RE")
_CONTROL, _PAYLOAD, _LONGEST = 1, 2, 4096
_H, _M = ord("H"), ord("M")


class Parser(stock.Parser):
    """`nats.protocol.parser.Parser` with `parse` read in place (state kept in the same fields)."""

    async def parse(self, data: bytes = b"") -> None:
        kept = self.buf  # what an earlier chunk left unread; `reset` puts a new one in its place
        if kept:
            kept.extend(data)
            if self.state == _PAYLOAD and len(kept) < self.needed + 2:
                return  # a big payload arriving read by read: gathered, not copied at each read
            data = bytes(kept)
        elif type(data) is not bytes:
            data = bytes(data)  # slices of it become payloads: bytes, as nats-py's are
        end, pos = len(data), 0
        nc: Any = self.nc
        quick = getattr(nc, "quick_sid", -1)  # the subscription whose answers `nc.take` may take
        skips = getattr(nc, "skips", None)  # subscriptions whose listeners skip some messages (`nc.skipped`)
        try:
            while pos < end:
                if self.state == _CONTROL:
                    first = data[pos]
                    m = _HMSG.match(data, pos) if first == _H else _MSG.match(data, pos) if first == _M else None
                    if m is not None:
                        args = self.msg_arg  # filled in nats-py's order: a malformed line leaves what it leaves
                        try:
                            if first == _H:
                                subject, sid, _, reply, header_size, needed = m.groups()
                            else:
                                subject, sid, _, reply, needed = m.groups()
                            args["subject"] = subject
                            args["sid"] = int(sid)
                            args["reply"] = reply or b""
                            self.needed = int(needed)
                            if first == _H:
                                self.header_needed = int(header_size)
                        except Exception as err:
                            raise ProtocolError("nats: malformed MSG") from err
                        pos = m.end()
                        self.state = _PAYLOAD
                        continue
                    if m := _OK.match(data, pos):
                        pos = m.end()
                        continue
                    if m := _ERR.match(data, pos):
                        await nc._process_err(m.group(1).decode().lower())
                        pos = m.end()
                    elif m := _PING.match(data, pos):
                        pos = m.end()
                        await nc._process_ping()
                    elif m := _PONG.match(data, pos):
                        pos = m.end()
                        await nc._process_pong()
                    elif m := _INFO.match(data, pos):
                        info = json.loads(m.group(1).decode())
                        await nc._process_info(info)
                        pos = m.end()
                    else:
                        if end - pos < _LONGEST and data.find(b"\r\n", pos) != -1:
                            raise ProtocolError("nats: unknown protocol")
                        break  # a control line split between reads: wait for the rest
                    if self.buf is not kept:
                        return  # the client reset the parser (it is reconnecting): the rest is void
                else:
                    needed = self.needed
                    if end - pos < needed + 2:
                        break  # the payload is split between reads
                    args = self.msg_arg
                    split = self.header_needed
                    if split > 0:
                        hdr: bytes | None = data[pos : pos + split]
                        payload = data[pos + split : pos + needed]
                        self.header_needed = 0
                    else:
                        hdr, payload = None, data[pos : pos + needed]
                    pos += needed + 2
                    self.state = _CONTROL
                    sid = args["sid"]
                    if sid == quick and nc.take(sid, args["subject"], payload, hdr):
                        continue
                    if skips and sid in skips and nc.skipped(sid, args["subject"], payload):
                        continue
                    await nc._process_msg(sid, args["subject"], args["reply"], payload, hdr)
                    if self.buf is not kept:
                        return
        finally:
            if self.buf is kept:
                kept[:] = data[pos:]  # at most a split message: the rest was read
