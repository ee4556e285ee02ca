"""One trace per session across processes, exported with the real OTLP/HTTP exporter to a receiver here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

import agentbus
from agentbus.config import Settings
from agentbus.messages import SessionCreated

SCRIPT = [
    {
        "model": "claude-sonnet-4-6",
        "content": [
            {"type": "tool_use", "id": "tu_1", "name": "write_file", "input": {"path": "out.txt", "content": "x"}}
        ],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 3},
    },
    {
        "model": "claude-sonnet-4-6",
        "content": [{"type": "text", "text": "wrote out.txt"}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 12, "output_tokens": 4},
    },
]


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    service: str
    attributes: dict[str, Any] = field(default_factory=dict)


class Receiver:
    """An OTLP/HTTP endpoint: decodes trace exports (protobuf), counts every request."""

    def __init__(self, port: int = 0) -> None:
        self.spans: list[Span] = []
        self.requests: list[str] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver.lock:
                    receiver.requests.append(self.path)
                if self.path == "/v1/traces":
                    receiver._add(body)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def _add(self, body: bytes) -> None:
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        for rs in req.resource_spans:
            service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    attrs = {a.key: json.loads(_any(a.value)) for a in s.attributes}
                    span = Span(s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name, service, attrs)
                    with self.lock:
                        self.spans.append(span)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _any(value: Any) -> str:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return json.dumps([json.loads(_any(v)) for v in value.array_value.values])
    return json.dumps(getattr(value, kind) if kind else None)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def _start(role: list[str], settings: Settings, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "agentbus.cli", *role, "--nats", settings.nats_url, "--prefix", settings.prefix]
    with log.open("ab") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


def _run_session(settings: Settings, tmp_path: Path, env: dict[str, str]) -> str:
    """Router, agent and evaluator as separate processes; `agentbus submit` as a fourth; returns the session id."""
    script = tmp_path / "script.json"
    script.write_text(json.dumps(SCRIPT))
    roles = [
        ["router", "--default-pool", "w"],
        ["agent", "--pool", "w", "--model", f"scripted:{script}", "--workdir", str(tmp_path / "work")],
        ["evaluator", "--workdir", str(tmp_path / "work")],  # where the agent's workspaces are
    ]
    procs = [_start(role, settings, env, tmp_path / f"{role[0]}.log") for role in roles]
    try:
        out = subprocess.run(
            [sys.executable, "-m", "agentbus.cli", "submit", "write out.txt", "--check", "test -f out.txt",
             "--wait", "--timeout", "40", "--json", "--nats", settings.nats_url, "--prefix", settings.prefix],
            env=env, capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr.decode() + "".join((tmp_path / f"{r[0]}.log").read_text() for r in roles)
        result = json.loads(out.stdout)
        assert result["status"] == "completed"
        return str(result["session_id"])
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)  # a clean stop flushes the span processors
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.mark.timeout(120)
async def test_every_span_of_a_session_shares_one_trace_and_forms_one_tree_across_processes(
    client: agentbus.Client, settings: Settings, tmp_path: Path, receiver: Receiver
) -> None:
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "200"}
    env.pop("OTEL_TRACES_EXPORTER", None)
    sid = _run_session(settings, tmp_path, env)

    created = (await client.show(sid))[0].event
    assert isinstance(created, SessionCreated) and created.trace_id
    spans = [s for s in receiver.spans if s.trace_id == created.trace_id]
    services = {s.service for s in spans}
    assert {"agentbus-router", "agentbus-agent", "agentbus-evaluator"} <= services, services
    assert "agentbus-cli" in services
    ids = {s.span_id for s in spans}
    roots = [s for s in spans if not s.parent_id]
    assert [r.name for r in roots] == ["submit"]
    orphans = [(s.name, s.service) for s in spans if s.parent_id and s.parent_id not in ids]
    assert orphans == []
    names = {s.name for s in spans}
    assert {"submit", "route", "process w", "chat scripted", "execute_tool write_file", "evaluate"} <= names
    chat = next(s for s in spans if s.name.startswith("chat "))
    assert chat.attributes["gen_ai.usage.input_tokens"] in (10, 12)
    assert chat.attributes["gen_ai.operation.name"] == "chat"
    assert chat.attributes["gen_ai.response.model"] == "claude-sonnet-4-6"
    assert all(s.attributes.get("agentbus.session_id") == sid for s in spans if s.name != "publish batch"), [
        s.name for s in spans if s.attributes.get("agentbus.session_id") != sid
    ]
    evaluate = next(s for s in spans if s.name == "evaluate")
    assert evaluate.attributes["agentbus.verdict"] == "satisfied"
    assert {s.trace_id for s in receiver.spans if s.attributes.get("agentbus.session_id") == sid} == {created.trace_id}
    assert "/v1/metrics" in receiver.requests


async def test_with_no_exporter_configured_nothing_is_sent_and_the_services_run_as_before(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    try:
        default_port = Receiver(4318)  # where an SDK with default settings would send
    except OSError:
        pytest.skip("127.0.0.1:4318 is in use; cannot watch the default OTLP port")
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        sid = _run_session(settings, tmp_path, env)
    finally:
        default_port.close()
    created = (await client.show(sid))[0].event
    assert isinstance(created, SessionCreated)
    assert created.trace_id is None
    assert default_port.requests == []


def test_with_no_sdk_a_span_carries_a_remote_parent_on_and_adds_no_context_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fast path (nothing records spans) must still pass a trace through this process, as the
    API's no-op tracer does: a consumer's publishes name the trace of the message it works on."""
    from agentbus import tracing

    monkeypatch.setattr(tracing, "recording", lambda: False)
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    parent = tracing.context_from({"traceparent": traceparent})
    with tracing.span("process", parent=parent, session_id="s1"):
        carried: dict[str, str] = {}
        tracing.inject(carried)
        assert tracing.current_trace_id() == "0af7651916cd43dd8448eb211c80319c"
    assert carried["traceparent"] == traceparent
    with tracing.span("publish"):
        alone: dict[str, str] = {}
        tracing.inject(alone)
    assert alone == {}
    assert tracing.current_trace_id() is None
    try:
        with tracing.span("fails", parent=parent):
            raise ValueError("boom")
    except ValueError:
        pass
    assert tracing.current_trace_id() is None  # the parent's context was detached on the way out


def test_recording_follows_the_installed_tracer_provider() -> None:
    """`recording` reads the API's global instead of its getter (which looks in os.environ on every
    call): it must still say yes once a provider is installed, as `setup` and tests do."""
    code = (
        "from opentelemetry import trace\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "from agentbus import tracing\n"
        "before = tracing.recording()\n"
        "trace.set_tracer_provider(TracerProvider())\n"
        "print(before, tracing.recording())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["False", "True"]
