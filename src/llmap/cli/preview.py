"""``llmap run ... --preview N`` on screen: each sampled row's inputs and answer, in one table."""

from __future__ import annotations

import json
from typing import Any

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from llmap.preview import Preview

__all__ = ["preview_summary", "preview_table"]

#: Characters of an input value shown before it is cut.
INPUT_CHARS = 120


def _value(v: Any, most: int) -> str:
    if v is None:
        return "null"
    text = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
    text = " ".join(text.split())
    return text if len(text) <= most else text[:most - 1] + "…"


def _pairs(values: dict[str, Any], names: list[str], most: int, style: str) -> Text:
    out = Text()
    for i, n in enumerate(names):
        if i:
            out.append("\n")
        out.append(f"{n}: ", style=style)
        out.append(_value(values.get(n), most))
    return out


def preview_table(p: Preview, *, title: str) -> Table:
    """The sampled rows as a table: the key, each template input as ``name: value``, then the answer's fields as
    ``field: value`` (or the error), one row of the input per table row; long inputs are cut at
    :data:`INPUT_CHARS` characters."""
    table = Table(title=title, title_justify="left", show_lines=True, header_style="bold")
    table.add_column("row" if all(r.key == str(r.seq) for r in p.rows) else "key", no_wrap=True, style="dim")
    table.add_column("inputs", overflow="fold", ratio=3)
    table.add_column("answer", overflow="fold", ratio=2)
    for r in p.rows:
        if r.answer is not None:
            answer = _pairs(r.answer, p.fields, 400, "bold cyan")
            if r.status == "fallback":
                answer.append("\n(fallback)", style="yellow")
        else:
            answer = Text(f"{r.status}: {_value(r.error, 400)}", style="red")
        table.add_row(escape(r.key), _pairs(r.inputs, p.columns, INPUT_CHARS, "bold"), answer)
    return table


def preview_summary(p: Preview) -> str:
    """One line: rows, their statuses, requests and tokens (the cache's answers cost none), time."""
    counts: dict[str, int] = {}
    for r in p.rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    cached = sum(1 for r in p.rows if r.source == "cache")
    states = ", ".join(f"{n} {s}" for s, n in counts.items())
    cost = f", ${p.cost_usd:,.4f}" if p.cost_usd else ""
    return (f"llmap: preview of {len(p.rows)} sampled rows (seed {p.seed}): {states}; {cached} from the response "
            f"cache; {p.requests:,} requests, {p.prompt_tokens + p.completion_tokens:,} tokens{cost}, "
            f"{p.elapsed_s:.1f} s; nothing written to the job's ledger or folder")
