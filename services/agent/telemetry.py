"""What an agent tells OpenTelemetry about a model call (GenAI semantic conventions)."""

from __future__ import annotations

from opentelemetry.trace import Span

from agentbus import tracing
from agentbus.messages import Usage
from agentbus.models import cost_usd


def request_model(spec: str) -> str:
    """The model id a spec asks the API for (`anthropic:claude-x` → `claude-x`; `scripted:f` → `scripted`)."""
    scheme, _, rest = spec.partition(":")
    return rest if scheme == "anthropic" else scheme


def record_usage(span: Span, model: str, usage: Usage, stop_reason: str | None) -> None:
    """Usage attributes on the call's span, and the same figures as metrics."""
    span.set_attributes(
        {
            "gen_ai.response.model": model,
            "gen_ai.response.finish_reasons": [stop_reason or ""],
            "gen_ai.usage.input_tokens": usage.input_tokens,
            "gen_ai.usage.output_tokens": usage.output_tokens,
            "gen_ai.usage.cache_creation.input_tokens": usage.cache_creation_input_tokens,
            "gen_ai.usage.cache_read.input_tokens": usage.cache_read_input_tokens,
        }
    )
    labels = {"gen_ai.response.model": model}
    tracing.model_calls.add(1, labels)
    for kind, count in (
        ("input", usage.input_tokens),
        ("output", usage.output_tokens),
        ("cache_creation", usage.cache_creation_input_tokens),
        ("cache_read", usage.cache_read_input_tokens),
    ):
        tracing.tokens.add(count, {**labels, "gen_ai.token.type": kind})
    tracing.dollars.add(cost_usd(model, usage), labels)
