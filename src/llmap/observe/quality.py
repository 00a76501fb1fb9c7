"""How the quality figures look: ``llmap eval`` (and its section of ``llmap report``), ``eval --models``,
``llmap runs``, and the HTML report's evaluation section.

Presentation only: the figures come from :mod:`llmap.quality.eval`, :mod:`llmap.quality.compare` and
:mod:`llmap.store.history`. Rates print as ``0.836 [0.724, 0.909] (51/61)``: the value, its 95% Wilson
interval and the sample size.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from llmap.observe import svg
from llmap.observe.status import structured_by_model
from llmap.quality.compare import ModelResult
from llmap.quality.confidence import SHORT_STRING, covered_fields
from llmap.quality.eval import EvalReport, FieldReport
from llmap.quality.metrics import Classification, NumberFigures, StringFigures
from llmap.spec import JobSpec
from llmap.store.history import RunInfo
from llmap.store.ledger import open_for_reading

__all__ = ["ConfidenceLine", "compare_table", "confidence_lines", "eval_html", "eval_tables", "runs_table"]


def _v(x: Any) -> str:
    return "(null)" if x is None else str(x).lower() if isinstance(x, bool) else str(x)


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _counts(f: FieldReport) -> str:
    extra = []
    if f.failed:
        extra.append(f"{f.failed} failed")
    if f.pending:
        extra.append(f"{f.pending} pending or skipped")
    src = ", ".join(f"{s}: {n}" for s, n in f.sources.items())
    return (f"{f.done} of {f.labelled} labelled rows done" + (f" ({', '.join(extra)}: not compared)" if extra else "")
            + f"; labels from {src}")


def _field_tables(f: FieldReport) -> list[Any]:
    g = f.figures
    head = Text(f"{f.name} ({f.type}{', enum' if f.kind == 'enum' and f.type != 'boolean' else ''}): ", style="bold")
    parts: list[Any] = []
    if isinstance(g, Classification):
        parts.append(Text.assemble(head, f"accuracy {g.accuracy.text()}; macro F1 {_num(g.macro_f1)}"))
        parts.append(Text(_counts(f), style="dim"))
        t = Table(title=f"{f.name}: per class", title_justify="left")
        for col in ("class", "support", "precision [95% CI] (k/n)", "recall [95% CI] (k/n)", "F1"):
            t.add_column(col, justify="left" if col == "class" else "right")
        for c in g.classes:
            if c.support or c.precision.n:
                t.add_row(_v(c.label), str(c.support), c.precision.text(), c.recall.text(), _num(c.f1))
        parts.append(t)
        shown = [i for i, lab in enumerate(g.labels) if sum(g.matrix[i]) or sum(r[i] for r in g.matrix)]
        m = Table(title=f"{f.name}: confusion matrix (rows: label, columns: answer)", title_justify="left")
        m.add_column("label \\ answer")
        for j in shown:
            m.add_column(_v(g.labels[j]), justify="right")
        for i in shown:
            m.add_row(_v(g.labels[i]), *[str(g.matrix[i][j]) if g.matrix[i][j] else "." for j in shown])
        parts.append(m)
    elif isinstance(g, NumberFigures):
        mae = f"MAE {_num(g.mae, '.4g')}" + (f" [{_num(g.mae_low, '.4g')}, {_num(g.mae_high, '.4g')}]"
                                               if g.mae_low is not None else "") + f" (n = {g.n})"
        within = (f"; within ±{g.tolerance:g}: {g.within.text()}"
                  if g.within is not None and g.tolerance is not None else "")
        parts.append(Text.assemble(head, f"exact {g.exact.text()}; {mae}{within}"))
        parts.append(Text(_counts(f), style="dim"))
    elif isinstance(g, StringFigures):
        parts.append(Text.assemble(head, f"exact {g.exact.text()}; normalized {g.normalized.text()}"))
        parts.append(Text(_counts(f), style="dim"))
    return parts


def eval_tables(rep: EvalReport) -> Group:
    """``llmap eval``'s terminal output: per field, its figures (and for an enum the per-class table and the
    confusion matrix), then the reliability table and ECE when there is confidence."""
    parts: list[Any] = [Text(f"{rep.job}: {rep.labelled_rows:,} labelled rows of {rep.rows:,} in run {rep.run}"
                             + (f" ({rep.labels_elsewhere:,} labelled keys not in it)" if rep.labels_elsewhere else ""),
                             style="bold")]
    for f in rep.fields:
        parts += _field_tables(f)
    c = rep.calibration
    if c is not None:
        fields = ", ".join(rep.confidence_fields)
        parts.append(Text.assemble(
            Text("calibration", style="bold"),
            f" of _confidence ({fields}): ECE {_num(c.ece)} over {c.n} rows; mean confidence "
            f"{_num(c.mean_right)} when right ({c.right}), {_num(c.mean_wrong)} when wrong ({c.wrong})"))
        t = Table(title="reliability table", title_justify="left")
        for col in ("confidence", "rows", "mean confidence", "accuracy [95% CI] (k/n)"):
            t.add_column(col, justify="right")
        for b in c.bins:
            if b.n:
                t.add_row(f"{b.low:.1f}-{b.high:.1f}", str(b.n), _num(b.confidence), b.accuracy.text())
        parts.append(t)
    elif rep.confidence_fields:
        parts.append(Text(f"calibration: no labelled done row has a _confidence ({rep.without_confidence} without "
                          "one); see `llmap report` for why", style="dim"))
    return Group(*parts)


def compare_table(results: Sequence[ModelResult], sample: int) -> Table:
    """``llmap eval --models``: the models side by side, most accurate first."""
    t = Table(title=f"{sample:,} labelled rows through each model (most accurate first)", title_justify="left")
    for col in ("rank", "model", "done", "accuracy [95% CI] (k/n)", "cost (USD)", "USD per correct", "latency (s)",
                "sent now"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in results:
        cost = "unknown (no prices)" if r.cost_usd is None else f"{r.cost_usd:.6f}"
        per = "-" if r.cost_per_correct_usd is None else f"{r.cost_per_correct_usd:.6f}"
        t.add_row(str(r.rank), r.model, f"{r.done}/{r.sample}", r.accuracy.text(), cost, per,
                  _num(r.latency_s), f"{r.requests:,} (${r.spent_usd:.4f})")
    return t


def runs_table(runs: Sequence[RunInfo]) -> Table:
    """``llmap runs``: oldest first."""
    t = Table(title="runs (oldest first)", title_justify="left")
    for col in ("run", "started", "exit", "settled", "done/failed/pending", "requests", "cost (USD)", "models",
                "prompt+fields", "changed", "rolled back"):
        t.add_column(col, justify="right" if col in ("run", "settled", "requests", "cost (USD)", "changed") else "left")
    for r in runs:
        t.add_row(str(r.run_id), time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.started_at)),
                  r.exit_reason or "not ended", _int(r.settled),
                  f"{_int(r.done)}/{_int(r.failed)}/{_int(r.pending)}", _int(r.requests),
                  "-" if r.cost_usd is None else f"{r.cost_usd:.4f}", ", ".join(r.models) or "-",
                  (r.prompt_hash or r.spec_hash)[:10], f"{r.changed:,}",
                  time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.rolled_back_at)) if r.rolled_back_at else "")
    return t


def _int(x: int | None) -> str:
    return "-" if x is None else f"{x:,}"


def eval_html(rep: EvalReport) -> str:
    """The HTML report's evaluation section (tables, no script)."""
    e = svg.esc
    out = [f"<p>{e(f'{rep.labelled_rows:,} labelled rows of {rep.rows:,} in run {rep.run}')}</p>"]
    for f in rep.fields:
        g = f.figures
        if isinstance(g, Classification):
            out.append(f"<h3>{e(f.name)}: accuracy {e(g.accuracy.text())}</h3><p>{e(_counts(f))}</p>")
            rows = "".join(f"<tr><td>{e(_v(c.label))}</td><td class=\"n\">{c.support}</td><td class=\"n\">"
                           f"{e(c.precision.text())}</td><td class=\"n\">{e(c.recall.text())}</td>"
                           f"<td class=\"n\">{e(_num(c.f1))}</td></tr>"
                           for c in g.classes if c.support or c.precision.n)
            out.append("<table><tr><th>Class</th><th>Support</th><th>Precision [95% CI]</th><th>Recall [95% CI]</th>"
                       f"<th>F1</th></tr>{rows}</table>")
            shown = [i for i in range(len(g.labels)) if sum(g.matrix[i]) or sum(r[i] for r in g.matrix)]
            head = "".join(f"<th>{e(_v(g.labels[j]))}</th>" for j in shown)
            body = "".join(f"<tr><th>{e(_v(g.labels[i]))}</th>" + "".join(
                f"<td class=\"n\">{g.matrix[i][j]}</td>" for j in shown) + "</tr>" for i in shown)
            out.append(f"<p>Confusion matrix (rows: label, columns: answer)</p><table><tr><th></th>{head}</tr>"
                       f"{body}</table>")
        elif isinstance(g, NumberFigures):
            within = f"; within ±{g.tolerance:g}: {g.within.text()}" if g.within is not None else ""
            out.append(f"<h3>{e(f.name)}: exact {e(g.exact.text())}; MAE {e(_num(g.mae, '.4g'))}{e(within)}</h3>"
                       f"<p>{e(_counts(f))}</p>")
        elif isinstance(g, StringFigures):
            out.append(f"<h3>{e(f.name)}: exact {e(g.exact.text())}; normalized {e(g.normalized.text())}</h3>"
                       f"<p>{e(_counts(f))}</p>")
    c = rep.calibration
    if c is not None:
        rows = "".join(f"<tr><td>{b.low:.1f}–{b.high:.1f}</td><td class=\"n\">{b.n}</td><td class=\"n\">"
                       f"{e(_num(b.confidence))}</td><td class=\"n\">{e(b.accuracy.text())}</td></tr>"
                       for b in c.bins if b.n)
        out.append(f"<h3>Calibration of _confidence: ECE {e(_num(c.ece))} over {c.n} rows</h3>"
                   "<table><tr><th>Confidence</th><th>Rows</th><th>Mean confidence</th><th>Accuracy [95% CI]</th>"
                   f"</tr>{rows}</table>")
    return "\n".join(out)


@dataclass
class ConfidenceLine:
    """How many of a model's done rows have a ``_confidence`` in the latest run, and why the others have none.

    Attributes:
        model: ``provider:name``.
        done: its done rows.
        with_confidence: of those, rows with a ``_confidence``.
        why: why the others have none, in words ("" when every row has one).
    """

    model: str
    done: int
    with_confidence: int
    why: str = ""


def confidence_lines(spec: JobSpec) -> list[ConfidenceLine]:
    """Per model, the latest run's done rows with and without ``_confidence``, and why (nothing is invented:
    no log-probabilities, no confidence).

    Raises:
        SpecError: no ledger or run yet.
    """
    covered = covered_fields(spec.output.fields, spec.output.confidence)
    ledger, plan = open_for_reading(spec.ledger_path, job=spec.name)
    try:
        rows = ledger.connection.execute(
            "SELECT model, source, count(*), count(confidence) FROM rows WHERE plan = ? AND status = 'done' "
            "GROUP BY model, source ORDER BY model, source", (plan,)).fetchall()
        dialects = structured_by_model(ledger.connection)
    finally:
        ledger.close()
    lines: dict[str, ConfidenceLine] = {}
    reasons: dict[str, list[str]] = {}
    for model, source, n, k in rows:
        label = model or "(none)"
        line = lines.setdefault(label, ConfidenceLine(label, 0, 0))
        line.done += n
        line.with_confidence += k
        if k == n:
            continue
        if spec.output.confidence is False:
            why = "[output] confidence = false"
        elif not covered:
            why = (f"no field it covers (an enum, a boolean, an integer, a string of max_length <= {SHORT_STRING}); "
                   "name fields with [output] confidence = [...]")
        elif label.startswith("anthropic:"):
            why = "Anthropic's Messages API returns no token log-probabilities"
        elif source in ("cache", "stale"):
            why = f"{n - k} answered from the response cache, stored without a confidence"
        elif "no logprobs" in dialects.get(label, ""):
            why = "the server refused the logprobs parameter (remembered, like a structured-output dialect)"
        elif label.startswith("local:"):
            why = "the embedded model returned no log-probabilities"
        else:
            why = "the server returned no log-probabilities"
        if why not in reasons.setdefault(label, []):
            reasons[label].append(why)
    for label, line in lines.items():
        line.why = "; ".join(reasons.get(label, []))
    return list(lines.values())
