"""Building a provider from a ``[model]`` table: the one place that knows every provider class."""

from __future__ import annotations

from llmap.control.lanes import MAX_CONCURRENCY
from llmap.providers.base import Provider
from llmap.spec import ModelSpec

__all__ = ["make_provider"]


def make_provider(spec: ModelSpec, *, concurrency: int | None) -> Provider:
    """Build the provider for one ``[model]`` entry.

    Args:
        spec: the ``[model]`` table.
        concurrency: ``[limits] concurrency``, or None when unset (adaptive for
            HTTP providers, up to :data:`~llmap.control.lanes.MAX_CONCURRENCY` in flight;
            the default process count for ``local``).

    Raises:
        SpecError: a missing API key variable, missing local-model packages or model file.
    """
    if spec.provider == "openai":
        from llmap.providers.openai import OpenAIProvider

        return OpenAIProvider(spec, concurrency=concurrency or MAX_CONCURRENCY)
    if spec.provider == "anthropic":
        from llmap.providers.anthropic import AnthropicProvider

        return AnthropicProvider(spec, concurrency=concurrency or MAX_CONCURRENCY)
    from llmap.providers.local.provider import LocalProvider

    return LocalProvider(spec, processes=concurrency)
