"""What a model call costs: USD per million tokens per model, each kind of input token at its own rate."""

from __future__ import annotations

import msgspec

from agentbus.messages import Usage

__all__ = ["PRICES", "Price", "cost_usd", "price_for"]


class Price(msgspec.Struct, frozen=True, kw_only=True):
    """USD per million tokens for each kind of token a call can use."""

    input: float
    output: float
    cache_write_5m: float  # 1.25 x input
    cache_read: float  # 0.1 x input


def _price(input: float, output: float) -> Price:
    return Price(input=input, output=output, cache_write_5m=input * 1.25, cache_read=input * 0.1)


# Keys are model-id prefixes; the longest matching prefix wins, so Opus 4.5+ (cheaper) overrides
# the Opus 4 / 4.1 family price. An unlisted later Opus 4.x falls back to the Opus 4 price,
# which over- rather than under-counts against a budget.
PRICES: dict[str, Price] = {
    "claude-opus-4": _price(15.0, 75.0),
    "claude-opus-4-5": _price(5.0, 25.0),
    "claude-opus-4-6": _price(5.0, 25.0),
    "claude-sonnet-4": _price(3.0, 15.0),
    "claude-haiku-4": _price(1.0, 5.0),
    "claude-3-5-haiku": _price(0.8, 4.0),
}


def price_for(model: str) -> Price | None:
    """The price of a model id (an `anthropic:` prefix is ignored), or None if unknown."""
    model_id = model.removeprefix("anthropic:")
    matches = [prefix for prefix in PRICES if model_id.startswith(prefix)]
    return PRICES[max(matches, key=len)] if matches else None


def cost_usd(model: str, usage: Usage) -> float:
    """What one call cost in USD; 0.0 for a model with no known price (scripted, unknown)."""
    price = price_for(model)
    if price is None:
        return 0.0
    total = (
        usage.input_tokens * price.input
        + usage.output_tokens * price.output
        + usage.cache_creation_input_tokens * price.cache_write_5m
        + usage.cache_read_input_tokens * price.cache_read
    )
    return total / 1_000_000
