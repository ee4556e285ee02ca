"""Every subject, stream, consumer and KV bucket agentbus uses; pure names, no I/O.

`subjects.md` at the repository root is the specification of this module, and
`tests/test_subjects_doc.py` keeps the two in step.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Literal

DEFAULT_PREFIX = "agentbus"
WORKER_TTL_S = 15.0

# A token that is safe inside a subject, a consumer name and a KV key.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")  # fullmatch: `$` would let a trailing newline in
_PREFIX = re.compile(r"[a-z][a-z0-9_]{0,31}")


def valid_token(value: str) -> bool:
    """True if `value` can stand as one subject token (session id, pool name)."""
    return bool(_TOKEN.fullmatch(value))


@dataclass(frozen=True, kw_only=True)
class StreamSpec:
    """What a stream must look like; the bus layer turns it into a JetStream config."""

    name: str
    subjects: tuple[str, ...]
    retention: Literal["limits", "workqueue", "interest"]
    duplicate_window_s: float = 120.0
    max_age_s: float = 0.0  # 0: unlimited
    max_bytes: int = -1  # -1: unlimited
    max_msg_size: int = -1
    discard: Literal["old", "new"] = "old"
    allow_direct: bool = True
    # a stream whose subjects another stream of the account may already hold: provisioning
    # goes on without it, and its readers fall back to something less durable
    optional: bool = False


@dataclass(frozen=True, kw_only=True)
class ConsumerSpec:
    """A durable pull consumer on one stream."""

    stream: str
    durable: str
    filter_subject: str
    ack_wait_s: float = 60.0
    max_deliver: int = 5
    max_ack_pending: int = 1000
    deliver: Literal["all", "new"] = "all"  # where a consumer made for the first time starts


@dataclass(frozen=True, kw_only=True)
class BucketSpec:
    """A KV bucket."""

    name: str
    history: int = 1
    ttl_s: float = 0.0


@dataclass(frozen=True)
class Namespace:
    """Builds every name under one prefix, so several deployments (or tests) share a server.

    Subjects are lowercase dot tokens: `<prefix>.<kind>...`. Stream names are the
    upper-cased prefix joined to the stream's role.
    """

    prefix: str = DEFAULT_PREFIX
    max_message_bytes: int = field(default=6 * 1024 * 1024 + 65536, compare=False)  # 6x the prompt limit

    def __post_init__(self) -> None:
        if not _PREFIX.fullmatch(self.prefix):
            raise ValueError(
                f"namespace prefix {self.prefix!r} must be lowercase letters, digits or '_' and start with a letter"
            )

    # --- subjects -------------------------------------------------------------------------

    def session_log(self, session_id: str) -> str:
        """Events written by the processes that own a session's work (fenced by the owner)."""
        return f"{self.prefix}.session.{_token(session_id, 'session id')}.log"

    def session_input(self, session_id: str, user: str) -> str:
        """Steering from one authenticated user (human messages, cancel requests): the last
        token is the sender, and the server lets each user publish only under their own name."""
        return f"{self.prefix}.session.{_token(session_id, 'session id')}.input.{_token(user, 'user name')}"

    def session_control(self, session_id: str, user: str) -> str:
        """Commands that start or fund a session (the submitted task, resume requests) from one
        authenticated user; apart from `input`, so a co-driver who may steer cannot also raise a budget."""
        return f"{self.prefix}.session.{_token(session_id, 'session id')}.control.{_token(user, 'user name')}"

    def session_all(self, session_id: str) -> str:
        """Every channel of one session, in stream order (one filter, so one scoped consumer reads it)."""
        return f"{self.prefix}.session.{_token(session_id, 'session id')}.>"

    def session_people(self, session_id: str) -> str:
        """What people write to one session (`input.<user>` and `control.<user>`), not the log channel."""
        return f"{self.prefix}.session.{_token(session_id, 'session id')}.*.*"

    def sessions_all(self) -> str:
        """Every channel of every session."""
        return f"{self.prefix}.session.>"

    def sessions_log_all(self) -> str:
        """The owner channel of every session (what the router's fan-in watches for ends)."""
        return f"{self.prefix}.session.*.log"

    def sessions_input_all(self) -> str:
        """The steering channels of every session and user."""
        return f"{self.prefix}.session.*.input.*"

    def sessions_people_all(self) -> str:
        """The steering and command channels of every session and user (not the log channels)."""
        return f"{self.prefix}.session.*.*.*"

    def sessions_control_all(self) -> str:
        """The command channels of every session and user."""
        return f"{self.prefix}.session.*.control.*"

    def submissions(self) -> str:
        """Tasks with no explicit pool, waiting for a router to choose one."""
        return f"{self.prefix}.submit"

    def work(self, pool: str) -> str:
        """Tasks queued for one agent pool."""
        return f"{self.prefix}.work.{_token(pool, 'pool name')}"

    def evaluations(self) -> str:
        """Sessions whose result waits for grading."""
        return f"{self.prefix}.evaluate"

    def scale_requests(self) -> str:
        """Requests for extra workers, answered by the supervisor (core request/reply)."""
        return f"{self.prefix}.supervisor.scale"

    def timers(self) -> str:
        """Wake-ups due later (an approval's timeout), held until their time by the agents."""
        return f"{self.prefix}.timer"

    def work_all(self) -> str:
        """Every pool's work queue."""
        return f"{self.prefix}.work.*"

    def exhausted(self, pool: str) -> str:
        """The server's advisory for a task of `pool` that used up its deliveries unacked."""
        return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.work_stream}.pool-{_token(pool, 'pool name')}"

    def exhausted_all(self) -> str:
        """Those advisories for every pool: captured in a stream, so none is lost while no agent runs."""
        return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.work_stream}.*"

    # --- streams, consumers, buckets ----------------------------------------------------

    @property
    def sessions_stream(self) -> str:
        return f"{self._upper}_SESSIONS"

    @property
    def submissions_stream(self) -> str:
        return f"{self._upper}_SUBMIT"

    @property
    def work_stream(self) -> str:
        return f"{self._upper}_WORK"

    @property
    def evaluations_stream(self) -> str:
        return f"{self._upper}_EVAL"

    @property
    def timers_stream(self) -> str:
        return f"{self._upper}_TIMERS"

    @property
    def exhausted_stream(self) -> str:
        return f"{self._upper}_EXHAUSTED"

    @property
    def workers_bucket(self) -> str:
        return f"{self._upper}_workers"

    @property
    def supervisors_bucket(self) -> str:
        return f"{self._upper}_supervisors"

    @property
    def state_bucket(self) -> str:
        return f"{self._upper}_state"

    @property
    def spend_bucket(self) -> str:
        return f"{self._upper}_spend"

    @property
    def keys_bucket(self) -> str:
        """Secrets of the deployment: `work` signs the openings routed work items carry
        (`agentbus.openings`). Services write it; services and agents read it; nobody else."""
        return f"{self._upper}_keys"

    @property
    def _upper(self) -> str:
        return self.prefix.upper()

    def streams(self) -> tuple[StreamSpec, ...]:
        """Every stream agentbus provisions, with its limits."""
        return (
            StreamSpec(
                name=self.sessions_stream,
                subjects=(self.sessions_log_all(), self.sessions_input_all(), self.sessions_control_all()),
                retention="limits",
                # A resumed agent re-appends what it may have written before dying; the
                # window must outlast ack wait plus a restart for that re-append to dedupe.
                duplicate_window_s=600.0,
                max_msg_size=self.max_message_bytes,
            ),
            StreamSpec(
                name=self.submissions_stream,
                subjects=(self.submissions(),),
                retention="workqueue",
                max_msg_size=self.max_message_bytes,
            ),
            StreamSpec(
                name=self.work_stream,
                subjects=(self.work_all(),),
                retention="workqueue",
                max_msg_size=self.max_message_bytes,
            ),
            StreamSpec(
                name=self.evaluations_stream,
                subjects=(self.evaluations(),),
                retention="workqueue",
                max_msg_size=self.max_message_bytes,
            ),
            StreamSpec(
                name=self.timers_stream,
                subjects=(self.timers(),),
                retention="workqueue",
                max_msg_size=self.max_message_bytes,
            ),
            # JetStream has no dead-letter queue: it only announces an exhausted task on a core
            # subject. Capturing the announcements keeps them until an agent of the pool records
            # the failure, even if none was running when the server sent them.
            StreamSpec(
                name=self.exhausted_stream,
                subjects=(self.exhausted_all(),),
                retention="workqueue",
                max_msg_size=self.max_message_bytes,
                # an account archiving `$JS.EVENT.ADVISORY.>` in a stream of its own overlaps
                optional=True,
            ),
        )

    def buckets(self) -> tuple[BucketSpec, ...]:
        """Every KV bucket agentbus provisions."""
        return (
            BucketSpec(name=self.state_bucket, history=1),
            # An agent that stops heartbeating disappears from the registry by itself.
            BucketSpec(name=self.workers_bucket, history=1, ttl_s=WORKER_TTL_S),
            # A supervisor's announcement of the pools it serves, dropped the same way.
            BucketSpec(name=self.supervisors_bucket, history=1, ttl_s=WORKER_TTL_S),
            BucketSpec(name=self.spend_bucket, history=1),
            BucketSpec(name=self.keys_bucket, history=1),
        )

    def retired_consumers(self) -> list[tuple[str, str]]:
        """Durables earlier versions made and nothing reads any more: (stream, durable)."""
        # router-fanin read every log record to notice fan-out siblings end; end writers now say so
        return [(self.sessions_stream, "router-fanin")]

    def router_consumer(self) -> ConsumerSpec:
        """The one durable all routers share: each submission goes to exactly one router."""
        return ConsumerSpec(
            stream=self.submissions_stream,
            durable="router",
            filter_subject=self.submissions(),
            ack_wait_s=30.0,
            max_deliver=5,
        )

    def evaluator_consumer(self) -> ConsumerSpec:
        """The one durable all evaluators share: each result is graded once per round."""
        return ConsumerSpec(
            stream=self.evaluations_stream,
            durable="evaluator",
            filter_subject=self.evaluations(),
            ack_wait_s=120.0,
            max_deliver=5,
        )

    def wake_consumer(self) -> ConsumerSpec:
        """The durable every agent shares: a person's input to a parked session queues it again."""
        return ConsumerSpec(
            stream=self.sessions_stream,
            durable="wake",
            filter_subject=self.sessions_input_all(),
            ack_wait_s=30.0,
            max_deliver=10,
            deliver="new",  # input older than the consumer wakes nothing: nothing was parked then
        )

    def wake_control_consumer(self) -> ConsumerSpec:
        """The durable every agent shares over people's command channels: a cancel there queues a parked
        session as input does, and what cannot be used there gets an `input_rejected`."""
        return ConsumerSpec(
            stream=self.sessions_stream,
            durable="wake-control",
            filter_subject=self.sessions_control_all(),
            ack_wait_s=30.0,
            max_deliver=10,
            deliver="new",
        )

    def timers_consumer(self) -> ConsumerSpec:
        """The durable every agent shares for wake-ups due later; a timer not yet due goes back until it is."""
        return ConsumerSpec(
            stream=self.timers_stream,
            durable="timers",
            filter_subject=self.timers(),
            ack_wait_s=30.0,
            max_deliver=-1,  # a timer waits by being given back with a delay: that must never run out
            max_ack_pending=100_000,
        )

    def exhausted_consumer(self, pool: str) -> ConsumerSpec:
        """The durable all agents of one pool share for its exhausted tasks."""
        return ConsumerSpec(
            stream=self.exhausted_stream,
            durable=f"exhausted-{_token(pool, 'pool name')}",
            filter_subject=self.exhausted(pool),
            ack_wait_s=30.0,
            max_deliver=-1,  # recording a failure must not itself give up
        )

    def pool_consumer(self, pool: str, *, ack_wait_s: float = 60.0, max_deliver: int = 5) -> ConsumerSpec:
        """The durable all agents of one pool share (work-queue: a task goes to one agent)."""
        return ConsumerSpec(
            stream=self.work_stream,
            durable=f"pool-{_token(pool, 'pool name')}",
            filter_subject=self.work(pool),
            ack_wait_s=ack_wait_s,
            max_deliver=max_deliver,
        )


def _token(value: str, what: str) -> str:
    if not _TOKEN.fullmatch(value):
        raise ValueError(f"{what} {value!r} must be 1-64 characters of letters, digits, '-' or '_'")
    return value


@functools.lru_cache(maxsize=4096)  # a read of one session parses a few subjects a thousand times
def parse_session_subject(subject: str) -> tuple[str, str, str] | None:
    """(session id, channel, sender) of a session subject, or None if it is not one.

    `<prefix>.session.<id>.log` has no sender; `<prefix>.session.<id>.input.<user>` and
    `.control.<user>` name the authenticated user who wrote it. A 4-token `.input` subject is a
    message recorded before senders were part of the subject (sender "").
    """
    parts = subject.split(".")
    if len(parts) == 4 and parts[1] == "session" and parts[3] in ("log", "input"):
        return parts[2], parts[3], ""
    if len(parts) == 5 and parts[1] == "session" and parts[3] in ("input", "control"):
        return parts[2], parts[3], parts[4]
    return None


def session_id_from_subject(subject: str) -> str | None:
    """The session id in a session subject (any channel), or None if it is not one."""
    parsed = parse_session_subject(subject)
    return parsed[0] if parsed else None
