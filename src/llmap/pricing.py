"""What usage costs: a model's prices per million tokens, prompt-cache reads and writes included.

Prices come from the ``[model]`` table (:class:`~llmap.spec.ModelSpec`):
``price_in`` and ``price_out`` (USD per million prompt / completion tokens),
``price_cache_read`` (default 0.1 x ``price_in`` for Anthropic, 0.5 x for
OpenAI, the ratios of their list prices) and ``price_cache_write`` (default
1.25 x ``price_in``, Anthropic's 5-minute cache writes). Every figure of
llmap's (the run's cost, ``max_cost_usd``, ``llmap report``, ``llmap
estimate``) comes from :func:`cost_usd`.
"""

from __future__ import annotations

from llmap.spec import ModelSpec

__all__ = ["cost_usd"]


def cost_usd(model: ModelSpec, prompt_tokens: int, completion_tokens: int, cache_read_tokens: int = 0,
             cache_write_tokens: int = 0) -> float:
    """USD for one usage at ``model``'s prices.

    Args:
        model: the ``[model]`` table (its prices, USD per million tokens).
        prompt_tokens: every input token, cached or not.
        completion_tokens: output tokens.
        cache_read_tokens: of ``prompt_tokens``, those read from the prompt cache.
        cache_write_tokens: of ``prompt_tokens``, those written to the prompt cache.

    Returns:
        USD: uncached input at ``price_in``, cache reads at ``price_cache_read``,
        cache writes at ``price_cache_write``, output at ``price_out``.
    """
    uncached = max(0, prompt_tokens - cache_read_tokens - cache_write_tokens)
    return (uncached * model.price_in + cache_read_tokens * model.cache_read_price
            + cache_write_tokens * model.cache_write_price + completion_tokens * model.price_out) / 1e6
