"""How records and sessions look on a terminal: one line each, the important part first.

Everything here prints what others wrote (a model, a tool, a person, a worker's registry entry),
so every line passes through `clean`: a model that writes `\x1b]0;...` or `\r` must not retitle,
recolour or overwrite the terminal of the person watching.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

from agentbus.messages import (
    BranchCreated,
    BranchMerged,
    BudgetExceeded,
    CancelRequested,
    ChangesCommitted,
    CommitFailed,
    DelegationCompleted,
    DelegationRequested,
    Hold,
    HumanMessage,
    InputRejected,
    InvalidEvent,
    ModelCallFailed,
    ModelResponded,
    PoolSpend,
    QuestionAsked,
    Record,
    ResumeRequested,
    RevisionRequested,
    Routed,
    SessionClaimed,
    SessionCreated,
    SessionEnded,
    StatusChanged,
    ToolCallCompleted,
    ToolCallStarted,
    UnknownEvent,
    VerdictRecorded,
    WorkerInfo,
    event_type,
)
from agentbus.state import SessionState

if TYPE_CHECKING:
    from agentbus.client import PoolInfo

_WIDTH = 100
# C0 and C1 control characters (ESC, CR, BEL, backspace, CSI, ...) and DEL, and the bidirectional
# overrides that can make text read differently from what it is; tab and newline are left to callers.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def clean(text: str, *, newlines: bool = True) -> str:
    """`text` with every control character shown as an escape (`\\x1b`), never sent to the terminal;
    with `newlines=False`, newlines and tabs become spaces, so one record stays one line."""
    if not newlines:
        text = text.replace("\n", " ").replace("\t", " ")
    return _UNSAFE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def record_line(record: Record, *, with_session: bool = False) -> str:
    ev = record.event
    clock = time.strftime("%H:%M:%S", time.localtime(getattr(ev, "ts", 0.0) or time.time()))
    where = f"{record.session_id} " if with_session else ""
    return clean(f"#{record.seq:<5} {clock} {where}{event_type(ev):<20} {summary(ev)}".rstrip(), newlines=False)


def summary(ev: Any) -> str:
    match ev:
        case SessionCreated(task=t):
            extra = []
            if t.pool:
                extra.append(f"pool={t.pool}")
            if t.parent_session:
                extra.append(f"parent={t.parent_session} depth={t.depth}")
            if t.criteria or t.checks:
                extra.append(f"criteria={len(t.criteria)} checks={len(t.checks)}")
            return _clip(f"by {t.submitter or '?'} {' '.join(extra)}: {t.prompt}")
        case Routed(pool=pool, rule=rule):
            return f"-> pool {pool} (rule: {rule})"
        case HumanMessage(author=author, text=text):
            return _clip(f"{author}: {text}")
        case CancelRequested(author=author, reason=reason):
            return f"by {author}" + (f": {reason}" if reason else "")
        case ResumeRequested(author=author):
            return f"by {author}"
        case StatusChanged(status=status, reason=reason):
            return status + (f" ({reason})" if reason else "")
        case SessionClaimed(worker=worker, attempt=attempt):
            return f"worker {worker}" + (f", attempt {attempt}" if attempt > 1 else "")
        case ModelResponded(step=step, stop_reason=stop, usage=u, cost_usd=cost, content=content):
            cached = u.cache_read_input_tokens + u.cache_creation_input_tokens
            tokens = f"in {u.input_tokens}" + (f" (+{cached} cache)" if cached else "") + f" out {u.output_tokens}"
            text = " ".join(str(b.get("text", "")) for b in content if b.get("type") == "text").strip()
            tools = [str(b.get("name")) for b in content if b.get("type") == "tool_use"]
            what = f"calls {', '.join(tools)}" if tools else text
            return _clip(f"step {step} {stop} · {tokens} · ${cost:.4f} · {what}")
        case ModelCallFailed(step=step, error=error, attempt=attempt, retry_in_s=retry):
            then = f"trying again in {retry:.0f}s" if retry else "giving up"
            return _clip(f"step {step}, attempt {attempt}: {error}; {then}")
        case ToolCallStarted(name=name, input=inp, rerun=rerun):
            return _clip(f"{name}({_args(inp)})" + (" [re-run after crash]" if rerun else ""))
        case ToolCallCompleted(name=name, output=output, is_error=is_error):
            return _clip(f"{name} {'ERROR ' if is_error else ''}-> {output}")
        case QuestionAsked(text=text):
            return _clip(f"asks: {text}")
        case DelegationRequested(child_session=child, pool=pool, prompt=prompt):
            return _clip(f"child {child} on {pool or 'router'}: {prompt}")
        case DelegationCompleted(child_session=child, status=status, result=result):
            return _clip(f"child {child} {status}: {result}")
        case VerdictRecorded(round=rnd, verdict=verdict, criteria=crit, checks=checks):
            failed = [c.criterion for c in crit if not c.passed] + [c.command for c in checks if not c.passed]
            return _clip(f"round {rnd}: {verdict}" + (f" (failed: {'; '.join(failed)})" if failed else ""))
        case RevisionRequested(round=rnd, critique=critique, fresh_start=fresh):
            lines = [x.strip() for x in critique.splitlines() if x.strip().startswith("-")]
            what = "; ".join(lines) or critique
            return _clip(f"round {rnd}{' (fresh start)' if fresh else ''}: {what}")
        case BudgetExceeded(limit=limit, detail=detail):
            return f"paused: {limit} {detail}".rstrip()
        case BranchCreated(branch=branch, base=base, base_commit=commit, repo=repo):
            return _clip(f"{branch} from {base} ({commit[:12]}) in {repo}")
        case ChangesCommitted(branch=branch, commit=commit, files_changed=n, insertions=ins, deletions=dels):
            return f"{commit[:12]} on {branch}: {n} file{'s' if n != 1 else ''} changed, +{ins} -{dels}"
        case CommitFailed(reason=reason, round=rnd):
            return _clip(f"round {rnd}: nothing committed: {reason}")
        case BranchMerged(branch=branch, into=into, result=result, fast_forward=ff, author=author):
            how = "fast-forward" if ff else f"merge commit {result[:12]}"
            return _clip(f"{branch} into {into} ({how}) by {author}")
        case SessionEnded(status=status, reason=reason, result=result):
            return _clip(f"{status}" + (f" ({reason})" if reason else "") + (f": {result}" if result else ""))
        case InputRejected(reason=reason):
            return _clip(reason)
        case UnknownEvent(data=data):
            return _clip(f"{ev.describe()} {data}")
        case InvalidEvent(reason=reason, raw=raw):
            return _clip(f"{reason} raw={raw!r}")
    return ""


def branch_line(s: SessionState) -> str:
    """Where a session on a repository left its work (empty for a session on none)."""
    if not s.branch:
        return ""
    if not s.commit:
        return clean(f"-- branch {s.branch} in {s.repo} (nothing committed)", newlines=False)
    line = (f"-- branch {s.branch} at {s.commit[:12]} in {s.repo}: {s.files_changed} files changed, "
            f"+{s.insertions} -{s.deletions}")  # fmt: skip
    if s.merged:
        line += f"; merged into {s.base} ({s.merged[:12]})"
    return clean(line, newlines=False)


def session_line(s: SessionState, now: float | None = None, id_width: int = 16) -> str:
    age = _age((now or time.time()) - s.created_ts) if s.created_ts else "?"
    tokens = s.usage.total
    return _clip(
        f"{s.session_id:<{id_width}}  {s.status:<10} {s.pool or '-':<12} {age:>6}  "
        f"steps {s.steps:<3} tok {tokens:<7} ${s.cost_usd:<8.4f} " + " ".join(s.prompt.split()),
        140,
        squash=False,
    )


def session_header(id_width: int = 16) -> str:
    """`id_width`: the longest id listed (child sessions carry a suffix), so columns line up."""
    return f"{'SESSION':<{id_width}}  {'STATUS':<10} {'POOL':<12} {'AGE':>6}  {'PROGRESS':<27} PROMPT"


def worker_header() -> str:
    return f"{'POOL':<12} {'WORKER':<24} {'WHERE':<22} {'BEAT':>5}  SESSIONS"


def worker_line(w: WorkerInfo, now: float | None = None) -> str:
    where = w.container or f"{w.host}:{w.pid}"
    beat = _age((now or time.time()) - w.heartbeat_ts)
    line = f"{w.pool:<12} {w.worker_id:<24} {where:<22} {beat:>5}  {', '.join(w.sessions) or '-'}"
    return clean(line, newlines=False)


def pool_header() -> str:
    return f"{'POOL':<12} {'AGENTS':>6} {'FREE':>5} {'WAITING':>7} {'RUNNING':>7} {'OLDEST':>6}  SERVED BY"


def pool_line(p: PoolInfo) -> str:
    """One pool; an unserved pool says how to serve it, since its tasks wait for nothing."""
    oldest = _age(p.oldest_waiting_s) if p.oldest_waiting_s is not None else "-"
    if p.served:
        agents = [f"{len(p.workers)} agent{'s' if len(p.workers) != 1 else ''}"] if p.workers else []
        by = ", ".join([*(f"supervisor {s}" for s in p.supervisors), *agents])
    else:
        by = f"nothing: agentbus agent --pool {p.name} --model ..., or [pools.{p.name}] in a pools file"
    line = f"{p.name:<12} {len(p.workers):>6} {p.free_slots:>5} {p.waiting:>7} {p.in_flight:>7} {oldest:>6}  {by}"
    return clean(line, newlines=False)


def spend_header() -> str:
    return f"{'POOL':<12} {'SPENT':>10} {'CALLS':>6} {'SINCE':>6}  HOLD"


def spend_line(pool: str, total: PoolSpend | None, hold: Hold | None, now: float | None = None) -> str:
    usd, calls = (total.usd, total.calls) if total else (0.0, 0)
    since = _age((now or time.time()) - total.since_ts) if total and total.since_ts else "-"
    held = f"{hold.limit}: {hold.detail}" if hold else "-"
    return clean(f"{pool:<12} {'$' + format(usd, '.4f'):>10} {calls:>6} {since:>6}  {held}", newlines=False)


def age(seconds: float) -> str:
    """A duration as people say it: 45s, 12m, 3h, 2d."""
    return _age(seconds)


def _age(seconds: float) -> str:
    seconds = max(seconds, 0)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def _args(inp: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in inp.items())


def _clip(text: str, width: int = _WIDTH, *, squash: bool = True) -> str:
    if squash:
        text = " ".join(text.split())
    text = clean(text, newlines=False)  # before measuring: an escape is wider than the character it shows
    return text if len(text) <= width else text[: width - 1] + "…"
