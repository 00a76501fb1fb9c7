"""``llmap estimate`` on screen: the :class:`~llmap.observe.estimate.rows.Estimate` as a table, or as plain text."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from llmap.observe.estimate.rows import Estimate

__all__ = ["estimate_text", "format_estimate"]


def _duration(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _rows(est: Estimate) -> Iterable[tuple[str, str, str]]:
    yield "rows in the input", f"{est.rows:,}", "after [input] where and limit"
    yield "already done", f"{est.done:,}", "ledger: done with the same inputs" if est.ledger_found else "no ledger yet"
    yield "skipped", f"{est.skipped:,}", "every template input is empty"
    yield "answered by the cache", f"{est.cached:,}", est.cache_source
    yield "duplicates", f"{est.duplicates:,}", "identical requests in this run, sent once"
    yield "rows to request", f"{est.to_request:,}", ""
    yield "requests", f"{est.requests:,}", f"pack = {est.pack}" if est.pack != 1 else ""
    basis = f"{est.prompt_chars:,} chars / {est.chars_per_token:.2f} chars per token ({est.chars_per_token_source})"
    if est.image_tokens:
        basis += f" + {est.image_tokens:,} for {est.images:,} image(s)"
    yield "prompt tokens", f"{est.prompt_tokens:,}", basis
    if est.documents_unread:
        yield ("documents not read yet", f"{est.documents_unread:,}",
               "each counted at its max_tokens (an upper bound); a run reads them")
    if est.cache_read_tokens:
        yield ("of them prompt-cache reads", f"{est.cache_read_tokens:,}",
               f"a {est.prefix_chars:,}-character shared prefix, read by every request after the first")
    primary = est.models[0] if est.models else None
    if primary is not None:
        yield ("completion tokens", f"{est.completion_tokens:,}",
               f"{primary.completion_per_row:.1f} per row ({est.completion_source})")
    for m in est.models:
        what = "primary" if m.role == "primary" else "if every row escalated"
        if m.free:
            what += ": the embedded model runs on this machine, at no charge"
            yield f"cost {m.label}", "$0", what
            continue
        what += f" at ${m.price_in:g} / ${m.price_out:g} per M tokens in / out"
        if m.cache_read_tokens:
            what += f", cache reads / writes ${m.price_cache_read:g} / ${m.price_cache_write:g}"
        if not (m.price_in or m.price_out):
            what += " (set [model] price_in and price_out)"
        yield f"cost {m.label}", f"${m.cost_usd:,.4f}", what
    if est.batch_cost_usd is not None and primary is not None:
        yield (f"cost {primary.label}, by batch", f"${est.batch_cost_usd:,.4f}",
               f"[model] batch = true: {est.batch_factor:g} x the real-time ${primary.cost_usd:,.4f} above; "
               "rows retried in real time cost full price")
    if len(est.models) > 1:
        yield "cost, upper bound", f"${est.cost_upper_usd:,.4f}", "primary + every escalation"
    if est.time_bound == "rpm":
        basis = f"{est.rpm:g} requests per minute"
    elif est.time_bound == "tpm":
        basis = f"{est.tpm:g} tokens per minute"
    else:
        basis = (f"{est.latency_s:.2f} s per request ({est.latency_source}) x {est.concurrency} in flight "
                 f"({est.concurrency_source})")
    yield "time", _duration(est.time_s), f"bound by {est.time_bound}: {basis}"
    if est.batch_cost_usd is not None:
        yield "time, by batch", "up to 24 h", "the batch APIs' completion window (most batches end within an hour)"
    yield "estimated in", f"{est.elapsed_s:.2f} s", "no request sent"


def format_estimate(est: Estimate) -> Any:
    """A ``rich.table.Table`` of the figures, their basis and the notes (for the terminal)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="llmap estimate", show_header=True, header_style="bold")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("basis", style="dim")
    for name, value, basis in _rows(est):
        table.add_row(escape(name), escape(value), escape(basis))
    if est.notes:
        table.caption = escape("; ".join(est.notes))
        table.caption_justify = "left"
    return table


def estimate_text(est: Estimate) -> str:
    """The same figures as plain text lines (for logs and ``--quiet`` output)."""
    rows = list(_rows(est))
    w = max(len(n) for n, _, _ in rows)
    v = max(len(x) for _, x, _ in rows)
    lines = [f"{n.ljust(w)}  {x.rjust(v)}  {b}".rstrip() for n, x, b in rows]
    return "\n".join(lines + [f"note: {n}" for n in est.notes])
