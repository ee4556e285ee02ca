"""OpenTelemetry for every agentbus process: one trace per session, across processes.

Configured only by the standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT` /
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_SERVICE_NAME`, `OTEL_TRACES_EXPORTER`
(`otlp`, `console`, `none`). With none of them set no SDK is installed: the API's
no-op tracer costs a function call per span and nothing leaves the process.

Context travels in NATS headers (`traceparent`), injected in `Bus.publish` and
extracted with `context_from(headers)` wherever a consumer starts work.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.trace import INVALID_SPAN, ProxyTracerProvider, Span, SpanKind, Status, StatusCode

SESSION_ID = "agentbus.session_id"
POOL = "agentbus.pool"

# The session and pool of the work in progress: every span started inside carries them,
# including the publish spans of the bus layer, which does not know what session it serves.
_scope: ContextVar[tuple[str | None, str | None]] = ContextVar("agentbus_scope", default=(None, None))

tracer = trace.get_tracer("agentbus")
# a provider named in the environment is made by the API's getter on first use
_PROVIDER_FROM_ENV = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ
meter = metrics.get_meter("agentbus")

sessions_ended = meter.create_counter("agentbus.sessions.ended", description="Sessions ended, by status")
model_calls = meter.create_counter("agentbus.model.calls", description="Model calls")
tokens = meter.create_counter("agentbus.model.tokens", unit="{token}", description="Tokens by kind")
dollars = meter.create_counter("agentbus.model.cost", unit="USD", description="Model spend")
queue_depth = meter.create_gauge("agentbus.queue.depth", description="Tasks waiting per pool (supervisor)")
workers = meter.create_gauge("agentbus.workers", description="Workers per pool (supervisor)")
tool_errors = meter.create_counter("agentbus.tool.errors", description="Tool calls that returned an error")


def _wanted(env: Mapping[str, str]) -> str | None:
    kind = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if kind == "none":
        return None
    if kind in ("console", "otlp"):
        return kind
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return "otlp"
    return None


def setup(default_service: str, env: Mapping[str, str] | None = None) -> Callable[[], None]:
    """Install the SDK if the environment asks for export; returns a flush-and-shutdown function."""
    env = os.environ if env is None else env
    kind = _wanted(env)
    if kind is None:
        return lambda: None
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or default_service})
    provider = TracerProvider(resource=resource)
    reader: PeriodicExportingMetricReader | None = None
    if kind == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        if env.get("OTEL_METRICS_EXPORTER", "otlp") != "none":
            reader = PeriodicExportingMetricReader(OTLPMetricExporter())
    if kind == "console" and env.get("OTEL_METRICS_EXPORTER", "") == "console":
        reader = PeriodicExportingMetricReader(ConsoleMetricExporter())
    trace.set_tracer_provider(provider)
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader] if reader else [])
    metrics.set_meter_provider(meter_provider)

    def shutdown() -> None:
        provider.shutdown()
        meter_provider.shutdown()

    return shutdown


_EMPTY = otel_context.Context()


def recording() -> bool:
    """Whether spans go anywhere: an SDK tracer provider is installed (by `setup`, or by a test)."""
    if _PROVIDER_FROM_ENV:
        return not isinstance(trace.get_tracer_provider(), ProxyTracerProvider)
    # The API's getter looks in os.environ on every call while no provider is set (twice per span
    # here); the global it returns once one is set answers the same question for free.
    return getattr(trace, "_TRACER_PROVIDER", None) is not None


def inject(headers: dict[str, str]) -> None:
    """Put the current trace context in `headers`, when there is one to carry."""
    if recording() or trace.get_current_span().get_span_context().is_valid:
        propagate.inject(headers)


def context_from(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The trace context a message carries (empty if none)."""
    if not recording() and (not headers or "traceparent" not in headers):
        return _EMPTY  # nothing to carry on, and nobody records: skip the propagators
    return propagate.extract(dict(headers or {}))


def current_trace_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


@contextmanager
def span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    parent: otel_context.Context | None = None,
    session_id: str | None = None,
    pool: str | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[Span]:
    """A span with the session and pool on it; an exception marks it failed and propagates.

    With no SDK installed (no export asked for) nothing records spans: this only carries a remote
    parent's context on, so the next hop's publishes still name its trace, as the API's no-op
    tracer would, at a fraction of the cost (a dozen spans per session on the hot path)."""
    if not recording():
        if parent is None:
            yield INVALID_SPAN
            return
        attached = otel_context.attach(parent)
        try:
            yield trace.get_current_span()
        finally:
            otel_context.detach(attached)
        return
    inherited_sid, inherited_pool = _scope.get()
    session_id, pool = session_id or inherited_sid, pool or inherited_pool
    attrs: dict[str, Any] = dict(attributes or {})
    if session_id:
        attrs[SESSION_ID] = session_id
    if pool:
        attrs[POOL] = pool
    token = _scope.set((session_id, pool))
    try:
        with tracer.start_as_current_span(name, context=parent, kind=kind, attributes=attrs) as s:
            try:
                yield s
            except BaseException as err:
                s.set_status(Status(StatusCode.ERROR, str(err)[:200]))
                raise
    finally:
        _scope.reset(token)


def messaging_attrs(subject: str, msg_id: str | None = None, operation: str = "publish") -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "messaging.system": "nats",
        "messaging.destination.name": subject,
        "messaging.operation.type": operation,
    }
    if msg_id:
        attrs["messaging.message.id"] = msg_id
    return attrs
