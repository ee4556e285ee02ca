"""The one error tree: every failure agentbus raises on purpose is an `AgentBusError`.

Each error carries the exit code the CLI uses for it, so the CLI prints one line
and exits with a documented code instead of a traceback.
"""

from __future__ import annotations


class AgentBusError(Exception):
    """Root of all agentbus errors."""

    exit_code = 1


class UsageError(AgentBusError, ValueError):
    """The caller asked for something malformed (bad session id, prompt too large, ...)."""

    exit_code = 2


class NoSuchSession(AgentBusError, LookupError):
    """No session with this id has anything in the log."""

    exit_code = 3

    def __init__(self, session_id: str) -> None:
        super().__init__(f"no such session: {session_id}")
        self.session_id = session_id


class NatsUnreachable(AgentBusError, ConnectionError):
    """The NATS server could not be reached (or has no JetStream)."""

    exit_code = 4

    def __init__(self, url: str, detail: str = "") -> None:
        msg = f"cannot reach NATS at {url}"
        super().__init__(f"{msg}: {detail}" if detail else msg)
        self.url = url


class SessionUnsuccessful(AgentBusError):
    """A session that was waited for ended without success."""

    exit_code = 5

    def __init__(self, session_id: str, status: str, reason: str = "") -> None:
        super().__init__(f"session {session_id} ended {status}" + (f": {reason}" if reason else ""))
        self.session_id = session_id
        self.status = status
        self.reason = reason


class FencedError(AgentBusError):
    """Another writer appended to the session first; this writer no longer owns it."""

    def __init__(self, session_id: str, expected_seq: int) -> None:
        super().__init__(
            f"session {session_id}: the log moved past sequence {expected_seq}; another writer appended first"
        )
        self.session_id = session_id
        self.expected_seq = expected_seq


class BusError(AgentBusError):
    """A JetStream operation failed (publish not acknowledged, provisioning refused, ...)."""


class Timeout(AgentBusError, TimeoutError):
    """A wait ran out of time."""

    exit_code = 5


class Interrupted(AgentBusError):
    """Ctrl-C while waiting: the wait ends, what was asked for goes on (exit code 130, as a shell's)."""

    exit_code = 130


class ServerError(AgentBusError):
    """The embedded nats-server could not be started."""


class ServerInUse(ServerError):
    """What a server needs is held by another process: its port, or its store directory (locked).

    Exit code 4, like an unreachable server: in both cases NATS is not there for you to use.
    """

    exit_code = 4


class NotPermitted(AgentBusError, PermissionError):
    """The server refused an operation this user's role does not allow (or an allow-list refused it)."""

    exit_code = 6

    def __init__(self, action: str, *, user: str = "", role: str | None = None, detail: str = "") -> None:
        who = f"{role or 'unknown role'} {user}".strip() if user or role else "this user"
        msg = f"not permitted: {action} ({who})"
        super().__init__(f"{msg}: {detail}" if detail else msg)
        self.action = action
        self.user = user
        self.role = role


class NotAuthenticated(AgentBusError):
    """The server refused the credentials (none given, unknown, revoked), or they could not be read."""

    exit_code = 6
