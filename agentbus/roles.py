"""Roles as NATS permissions: who may publish and subscribe to what, built from the namespace's names.

Pure: no I/O. The server's authorization block (`agentbus/auth.py`) is generated from
`permissions()`, and the permissions table in `subjects.md` is `MATRIX`, which
`tests/test_subjects_doc.py` checks twice: the document against `MATRIX`, and every cell of
`MATRIX` against what `permissions()` lets a user of that role publish or subscribe to.

Reading a stream never needs a broad grant: a reader creates its consumer on the
filter-scoped API subject `$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>` (one filter),
so a grant can name one session; replies, deliveries and flow control arrive in the user's
own inbox prefix `_INBOX_<user>`, which nobody else may subscribe to.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from agentbus.subjects import DEFAULT_PREFIX, Namespace, valid_token

Role = Literal["admin", "service", "agent", "operator", "codriver", "observer"]
ROLES: tuple[Role, ...] = ("admin", "service", "agent", "operator", "codriver", "observer")

ROLE_HELP: dict[str, str] = {
    "admin": "everything, in every namespace: streams, consumers (deletion too), every session",
    "service": "router, evaluator, supervisor: provision, route, grade, hold pools, write the state cache",
    "agent": "its pools' work queues, the session logs it writes, the registry, spend adds to its pools",
    "operator": "submit, say, cancel, resume, reset spend, read everything",
    "codriver": "read and steer (say, cancel) the granted sessions, or all",
    "observer": "read the granted sessions, or all",
}


@dataclass(frozen=True)
class Identity:
    """Who a connection is, as its credentials say: a user name, a role and what it is granted.

    `sessions` (codriver, observer) and `pools` (agent) are the grants; empty means all.
    `role` is None for credentials without agentbus metadata (a plain NATS user): nothing is
    assumed about them, and the server alone decides.
    """

    user: str
    role: Role | None = None
    prefix: str = DEFAULT_PREFIX
    sessions: tuple[str, ...] = ()
    pools: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not valid_token(self.user):
            raise ValueError(f"user name {self.user!r} must be 1-64 characters of letters, digits, '-' or '_'")
        if self.role is not None and self.role not in ROLES:
            raise ValueError(f"role {self.role!r} must be one of {', '.join(ROLES)}")
        for value in (*self.sessions, *self.pools):
            if not valid_token(value):
                raise ValueError(f"grant {value!r} must be 1-64 characters of letters, digits, '-' or '_'")

    @property
    def inbox_prefix(self) -> str:
        return inbox_prefix(self.user)

    def may_read(self, session_id: str) -> bool:
        """Whether the grants cover a session (admin, service, agent, operator read every session)."""
        return self.role not in ("codriver", "observer") or not self.sessions or session_id in self.sessions

    @property
    def manages_streams(self) -> bool:
        """May create and update streams and buckets (unknown roles are left to the server)."""
        return self.role in (None, "admin", "service")

    @property
    def lists_sessions(self) -> bool:
        """May list every session (stream info on the session stream)."""
        return self.role not in ("codriver", "observer") or not self.sessions


def inbox_prefix(user: str) -> str:
    """The user's own reply subjects: `_INBOX_<user>.>`, subscribable by that user only."""
    return f"_INBOX_{user}"


@dataclass(frozen=True)
class Permissions:
    """One user's NATS permissions: subject patterns it may publish and subscribe to."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False

    def may_publish(self, subject: str) -> bool:
        return any(subject_matches(p, subject) for p in self.publish)

    def may_subscribe(self, subject: str) -> bool:
        return any(subject_matches(p, subject) for p in self.subscribe)


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: `*` is one token, `>` one or more at the end (a literal `*` or `>`
    token in `subject`, as in a filter subject inside an API subject, is matched like any token)."""
    pat, sub = pattern.split("."), subject.split(".")
    for i, token in enumerate(pat):
        if token == ">":
            return len(sub) > i
        if i >= len(sub) or (token != "*" and token != sub[i]):
            return False
    return len(pat) == len(sub)


# --- building blocks -----------------------------------------------------------------------------


def _any(builder_result: str, placeholder: str) -> str:
    return builder_result.replace(placeholder, "*")


def _durable(stream: str, name: str, filter_subject: str) -> list[str]:
    """Create (filter-scoped), look up, pull from and ack one durable."""
    return [
        f"$JS.API.CONSUMER.CREATE.{stream}.{name}.{filter_subject}",
        f"$JS.API.CONSUMER.INFO.{stream}.{name}",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}",
        f"$JS.ACK.{stream}.{name}.>",
    ]


def _read_sessions(ns: Namespace, sessions: Sequence[str]) -> list[str]:
    """Replay and follow (scoped consumer, flow control), last-message lookups and the state cache
    entry of the granted sessions, or of all."""
    stream, state = ns.sessions_stream, ns.state_bucket
    pub = [f"$JS.FC.{stream}.>"]
    if not sessions:
        filt = ns.sessions_all()
        pub += [
            f"$JS.API.CONSUMER.CREATE.{stream}.*.{filt}",
            f"$JS.API.DIRECT.GET.{stream}.{filt}",
            f"$JS.API.DIRECT.GET.{stream}",  # batched reads with no consumer (the subject is in the body)
            f"$JS.API.DIRECT.GET.KV_{state}.$KV.{state}.*",
            f"$JS.API.DIRECT.GET.KV_{state}",  # every cached state in one batched read (the listing)
            f"$JS.API.STREAM.INFO.{stream}",  # the list of sessions
        ]
    for sid in sessions:
        filt = ns.session_all(sid)
        pub += [
            f"$JS.API.CONSUMER.CREATE.{stream}.*.{filt}",
            f"$JS.API.DIRECT.GET.{stream}.{filt}",
            f"$JS.API.DIRECT.GET.KV_{state}.$KV.{state}.{sid}",
        ]
    return pub


def _kv_streams(ns: Namespace) -> list[str]:
    return [f"KV_{b.name}" for b in ns.buckets()]


def _streams(ns: Namespace) -> list[str]:
    return [s.name for s in ns.streams()]


def _base(ident: Identity) -> tuple[list[str], list[str]]:
    return ["$JS.API.INFO"], [f"{ident.inbox_prefix}.>"]


# --- the roles -----------------------------------------------------------------------------------


def _admin(ident: Identity) -> Permissions:
    # Every namespace (`*` prefix), every JetStream API, but still only its own name on the
    # people's channels, and never a server advisory. Subscriptions: its inbox, advisories, and
    # the supervisor's requests (an admin may run any process by hand).
    u = ident.user
    pub = [
        "$JS.API.>", "$JS.ACK.>", "$JS.FC.>", "$KV.>",
        "*.session.*.log", f"*.session.*.input.{u}", f"*.session.*.control.{u}",
        "*.submit", "*.work.*", "*.evaluate", "*.supervisor.scale", "*.timer",
    ]  # fmt: skip
    # an admin may run any process by hand: an agent hears people's channels and its pool's hold
    sub = [f"{ident.inbox_prefix}.>", "*.supervisor.scale", "$JS.EVENT.>", "*.session.*.*.*", "$KV.*.hold.*"]
    return Permissions(tuple(pub), tuple(sub), allow_responses=True)


def _service(ident: Identity) -> Permissions:
    ns = Namespace(ident.prefix)
    pub, sub = _base(ident)
    for stream in (*_streams(ns), *_kv_streams(ns)):
        pub += [
            f"$JS.API.STREAM.CREATE.{stream}",
            f"$JS.API.STREAM.UPDATE.{stream}",
            f"$JS.API.STREAM.INFO.{stream}",
            f"$JS.API.STREAM.MSG.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}.>",
            f"$JS.API.CONSUMER.CREATE.{stream}.>",  # named, filter-scoped; never the unscoped form
            f"$JS.API.CONSUMER.INFO.{stream}.*",
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.*",
            f"$JS.ACK.{stream}.>",
            f"$JS.FC.{stream}.>",
        ]
    pub += [
        ns.sessions_log_all(),
        _any(ns.session_control("SX", ident.user), "SX"),  # the router's fan-out records sibling sessions
        ns.work_all(),
        ns.submissions(),  # a fan-out sibling's end, for the router to collect
        ns.evaluations(),
        f"$KV.{ns.state_bucket}.>",
        f"$KV.{ns.spend_bucket}.>",
        f"$KV.{ns.supervisors_bucket}.>",  # the supervisor's heartbeat: the pools it serves
        f"$KV.{ns.keys_bucket}.>",  # the first router makes the work key (agentbus.openings)
    ]
    sub.append(ns.scale_requests())
    return Permissions(tuple(pub), tuple(sub), allow_responses=True)  # scale replies


def _agent(ident: Identity) -> Permissions:
    ns = Namespace(ident.prefix)
    pub, sub = _base(ident)
    pub += [f"$JS.API.STREAM.INFO.{s}" for s in (*_streams(ns), *_kv_streams(ns))]
    pub += _read_sessions(ns, ())
    pools = ident.pools or ("*",)
    for pool in pools:
        work = ns.work(pool) if pool != "*" else ns.work_all()
        exhausted = ns.exhausted(pool) if pool != "*" else ns.exhausted_all()
        name = f"pool-{pool}" if pool != "*" else "*"
        pub += _durable(ns.work_stream, name, work)
        pub += _durable(ns.exhausted_stream, f"exhausted-{pool}" if pool != "*" else "*", exhausted)
        pub.append(f"$KV.{ns.spend_bucket}.pool.{pool}")
        sub.append(f"$KV.{ns.spend_bucket}.hold.{pool}")  # a hold set or lifted, heard as it happens
        sub.append(exhausted)  # live advisories, where they cannot be kept in a stream
    # every agent shares two durables: input that wakes a parked session, and timers coming due
    wake, timers = ns.wake_consumer(), ns.timers_consumer()
    pub += _durable(wake.stream, wake.durable, wake.filter_subject)
    control = ns.wake_control_consumer()  # people's command channels: cancels wake, bad input is answered
    pub += _durable(control.stream, control.durable, control.filter_subject)
    pub += _durable(timers.stream, timers.durable, timers.filter_subject)
    # interrupts reach the agent running the session the moment they come, and a run looks for
    # people's input only when some arrived
    sub.append(ns.sessions_people_all())
    pub += [
        f"$JS.API.STREAM.MSG.GET.{ns.work_stream}",  # an exhausted task's work item
        f"$JS.API.STREAM.MSG.DELETE.{ns.work_stream}",  # ... removed once its session is failed
        ns.timers(),  # an approval's timeout
        ns.sessions_log_all(),
        _any(ns.session_control("SX", ident.user), "SX"),  # delegation starts child sessions
        ns.work_all(),
        ns.submissions(),  # a fan-out sibling's end, for the router to collect
        ns.evaluations(),
        ns.scale_requests(),
        f"$KV.{ns.workers_bucket}.>",
        f"$JS.API.DIRECT.GET.KV_{ns.workers_bucket}.>",
        f"$JS.API.DIRECT.GET.KV_{ns.supervisors_bucket}.>",  # is a pool served? (submit, pools)
        f"$JS.API.DIRECT.GET.KV_{ns.spend_bucket}.>",
        # the key that signs the openings routed work carries: an agent may write any session's
        # log anyway, so it adds little an agent could forge with (subjects.md, AGENTBUS_keys)
        f"$JS.API.DIRECT.GET.KV_{ns.keys_bucket}.>",
    ]
    return Permissions(tuple(pub), tuple(sub))


def _operator(ident: Identity) -> Permissions:
    ns = Namespace(ident.prefix)
    pub, sub = _base(ident)
    pub += [f"$JS.API.STREAM.INFO.{s}" for s in (*_streams(ns), *_kv_streams(ns))]
    pub += _read_sessions(ns, ())
    pub += [
        _any(ns.session_input("SX", ident.user), "SX"),
        _any(ns.session_control("SX", ident.user), "SX"),
        ns.submissions(),
        ns.work_all(),
        ns.scale_requests(),
        # cancelling a session nobody has claimed withdraws its queued work item
        f"$JS.API.STREAM.MSG.GET.{ns.work_stream}",
        f"$JS.API.STREAM.MSG.DELETE.{ns.work_stream}",
        f"$JS.API.CONSUMER.LIST.{ns.work_stream}",  # `pools` and the web view's fleet page: each pool's backlog
        f"$KV.{ns.spend_bucket}.pool.*",  # spend --reset zeroes a total; holds stay the supervisor's
        f"$JS.API.DIRECT.GET.KV_{ns.workers_bucket}.>",
        f"$JS.API.DIRECT.GET.KV_{ns.supervisors_bucket}.>",  # is a pool served? (submit, pools)
        f"$JS.API.DIRECT.GET.KV_{ns.spend_bucket}.>",
    ]
    return Permissions(tuple(pub), tuple(sub))


def _codriver(ident: Identity) -> Permissions:
    ns = Namespace(ident.prefix)
    pub, sub = _base(ident)
    pub += _read_sessions(ns, ident.sessions)
    if ident.sessions:
        pub += [ns.session_input(sid, ident.user) for sid in ident.sessions]
    else:
        pub.append(_any(ns.session_input("SX", ident.user), "SX"))
    return Permissions(tuple(pub), tuple(sub))


def _observer(ident: Identity) -> Permissions:
    ns = Namespace(ident.prefix)
    pub, sub = _base(ident)
    pub += _read_sessions(ns, ident.sessions)
    return Permissions(tuple(pub), tuple(sub))


_BUILDERS = {
    "admin": _admin,
    "service": _service,
    "agent": _agent,
    "operator": _operator,
    "codriver": _codriver,
    "observer": _observer,
}


def permissions(ident: Identity) -> Permissions:
    """What the server lets this identity publish and subscribe to."""
    if ident.role is None:
        raise ValueError(f"user {ident.user} has no role; roles: {', '.join(ROLES)}")
    return _BUILDERS[ident.role](ident)


# --- the table in subjects.md ----------------------------------------------------------------------

Cell = Literal["yes", "no", "if all"]


@dataclass(frozen=True)
class Row:
    """One action of the permissions table: the NATS operation it takes, and who may.

    The probe subject uses placeholders: `<granted>` a session granted to the user, `<other>` one
    that is not, `<user>` the user's own name, `<someone>` another user's, `<pool>` a pool granted
    to an agent, `<otherpool>` one that is not. "if all" means: only for a user whose grant is
    every session (codriver, observer) or every pool (agent).
    """

    key: str
    action: str
    op: Literal["pub", "sub"]
    subject: str
    cells: tuple[Cell, Cell, Cell, Cell, Cell, Cell]  # in ROLES order

    def cell(self, role: str) -> Cell:
        return self.cells[ROLES.index(role)]  # type: ignore[arg-type,unused-ignore]


_S = "AGENTBUS_SESSIONS"
_W = "AGENTBUS_WORK"
MATRIX: tuple[Row, ...] = (
    Row("read", "read a granted session (tap, show, wait, state)", "pub",
        f"$JS.API.CONSUMER.CREATE.{_S}.c1.agentbus.session.<granted>.>", ("yes",) * 6),
    Row("read_other", "read another session", "pub",
        f"$JS.API.CONSUMER.CREATE.{_S}.c1.agentbus.session.<other>.>",
        ("yes", "yes", "yes", "yes", "if all", "if all")),
    Row("look_other", "read another session", "pub", f"$JS.API.DIRECT.GET.{_S}.agentbus.session.<other>.>",
        ("yes", "yes", "yes", "yes", "if all", "if all")),
    Row("list", "list every session (sessions)", "pub",
        f"$JS.API.STREAM.INFO.{_S}", ("yes", "yes", "yes", "yes", "if all", "if all")),
    Row("pools", "read every pool's backlog (pools, the fleet page)", "pub", f"$JS.API.CONSUMER.LIST.{_W}",
        ("yes", "no", "no", "yes", "no", "no")),
    Row("tap_all", "read every session (tap --all)", "pub",
        f"$JS.API.CONSUMER.CREATE.{_S}.c1.agentbus.session.>", ("yes", "yes", "yes", "yes", "if all", "if all")),
    Row("state_other", "read another session's cached state", "pub",
        "$JS.API.DIRECT.GET.KV_AGENTBUS_state.$KV.AGENTBUS_state.<other>",
        ("yes", "yes", "yes", "yes", "if all", "if all")),
    Row("submit", "submit (the task, on the submitter's control channel)", "pub",
        "agentbus.session.<other>.control.<user>", ("yes", "yes", "yes", "yes", "no", "no")),
    Row("submit_router", "submit without a pool (and tell the router a fan-out's sibling ended)", "pub",
        "agentbus.submit", ("yes", "yes", "yes", "yes", "no", "no")),
    Row("queue", "queue work on a pool (submit --pool, resume, delegate)", "pub", "agentbus.work.<otherpool>",
        ("yes", "yes", "yes", "yes", "no", "no")),
    Row("say", "say, cancel, interrupt, approve or dismiss, on a granted session", "pub",
        "agentbus.session.<granted>.input.<user>",
        ("yes", "no", "no", "yes", "yes", "no")),
    Row("say_other", "say, cancel, interrupt, approve or dismiss, on another session", "pub",
        "agentbus.session.<other>.input.<user>",
        ("yes", "no", "no", "yes", "if all", "no")),
    Row("say_as", "say as another user", "pub", "agentbus.session.<granted>.input.<someone>",
        ("no",) * 6),
    Row("resume", "resume (raise a budget)", "pub", "agentbus.session.<granted>.control.<user>",
        ("yes", "yes", "yes", "yes", "no", "no")),
    Row("write_log", "write a session's log", "pub", "agentbus.session.<granted>.log",
        ("yes", "yes", "yes", "no", "no", "no")),
    Row("write_state", "write the state cache", "pub", "$KV.AGENTBUS_state.<granted>",
        ("yes", "yes", "no", "no", "no", "no")),
    Row("hold", "set or lift a pool's hold", "pub", "$KV.AGENTBUS_spend.hold.<pool>",
        ("yes", "yes", "no", "no", "no", "no")),
    Row("reset_spend", "reset (or add to) a pool's spend", "pub", "$KV.AGENTBUS_spend.pool.<pool>",
        ("yes", "yes", "yes", "yes", "no", "no")),
    Row("reset_other", "reset (or add to) another pool's spend", "pub", "$KV.AGENTBUS_spend.pool.<otherpool>",
        ("yes", "yes", "if all", "yes", "no", "no")),
    Row("fetch", "take its pool's work", "pub", f"$JS.API.CONSUMER.MSG.NEXT.{_W}.pool-<pool>",
        ("yes", "yes", "yes", "no", "no", "no")),
    Row("fetch_other", "take another pool's work", "pub", f"$JS.API.CONSUMER.MSG.NEXT.{_W}.pool-<otherpool>",
        ("yes", "yes", "if all", "no", "no", "no")),
    Row("work_key", "read the key that signs routed work (agentbus.openings)", "pub",
        "$JS.API.DIRECT.GET.KV_AGENTBUS_keys.$KV.AGENTBUS_keys.work", ("yes", "yes", "yes", "no", "no", "no")),
    Row("make_work_key", "make the key that signs routed work", "pub", "$KV.AGENTBUS_keys.work",
        ("yes", "yes", "no", "no", "no", "no")),
    Row("registry", "heartbeat into the worker registry", "pub", "$KV.AGENTBUS_workers.<user>",
        ("yes", "no", "yes", "no", "no", "no")),
    Row("announce", "heartbeat into the supervisor registry", "pub", "$KV.AGENTBUS_supervisors.<user>",
        ("yes", "yes", "no", "no", "no", "no")),
    Row("supervisors", "read the supervisor registry (is a pool served?)", "pub",
        "$JS.API.DIRECT.GET.KV_AGENTBUS_supervisors.$KV.AGENTBUS_supervisors.<someone>",
        ("yes", "yes", "yes", "yes", "no", "no")),
    Row("hear_people", "hear what people write to any session, live (an agent: interrupts, and when to look)",
        "sub", "agentbus.session.*.*.*", ("yes", "no", "yes", "no", "no", "no")),
    Row("hear_hold", "hear its pool's hold set or lifted, live", "sub", "$KV.AGENTBUS_spend.hold.<pool>",
        ("yes", "no", "yes", "no", "no", "no")),
    Row("scale", "ask for workers", "pub", "agentbus.supervisor.scale", ("yes", "no", "yes", "yes", "no", "no")),
    Row("serve_scale", "answer requests for workers", "sub", "agentbus.supervisor.scale",
        ("yes", "yes", "no", "no", "no", "no")),
    Row("advisory", "publish a server advisory", "pub",
        f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{_W}.pool-<pool>", ("no",) * 6),
    Row("create_stream", "create or update a stream", "pub", f"$JS.API.STREAM.UPDATE.{_S}",
        ("yes", "yes", "no", "no", "no", "no")),
    Row("delete_stream", "delete a stream", "pub", f"$JS.API.STREAM.DELETE.{_S}", ("yes",) + ("no",) * 5),
    Row("delete_consumer", "delete a consumer", "pub", f"$JS.API.CONSUMER.DELETE.{_W}.pool-<pool>",
        ("yes",) + ("no",) * 5),
    Row("unscoped", "create an unscoped consumer", "pub", f"$JS.API.CONSUMER.CREATE.{_S}",
        ("yes",) + ("no",) * 5),
    Row("inbox_other", "subscribe to another user's replies", "sub", "_INBOX_<someone>.x",
        ("no",) * 6),
)  # fmt: skip


def probe(row: Row, user: str, *, granted: str, other: str, pool: str, otherpool: str, someone: str) -> str:
    """The row's subject with its placeholders filled in."""
    values = dict(granted=granted, other=other, user=user, someone=someone, pool=pool, otherpool=otherpool)
    return re.sub(r"<(\w+)>", lambda m: values[m.group(1)], row.subject)


def allowed(perms: Permissions, row: Row, subject: str) -> bool:
    return perms.may_publish(subject) if row.op == "pub" else perms.may_subscribe(subject)


def action_for(subject: str, user: str = "", rows: Iterable[Row] = MATRIX) -> str | None:
    """The table's name for the action a refused subject belongs to (for one-line refusals)."""
    for row in rows:
        if all(cell == "yes" for cell in row.cells):
            continue  # every role may: never why something was refused (a granted read shares its pattern)
        pattern = row.subject.replace(".c1.", ".*.").replace("<user>", user or "*")
        pattern = re.sub(r"<\w+>", "*", pattern)
        pattern = pattern.replace("AGENTBUS", "*").replace("agentbus", "*")
        # `*` inside a token too: stream and bucket names carry the prefix (AGENTBUS_SESSIONS)
        regex = "^" + re.escape(pattern).replace(r"\*", "[^.]*").replace(r"\>", ".+") + "$"
        if re.match(regex, subject, flags=re.IGNORECASE):
            return row.action
    return None
