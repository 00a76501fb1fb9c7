"""What ``llmap status``, ``llmap report`` and the HTML report say about a cascade with a guarantee.

Read from the ledger (read-only; :mod:`llmap.store.cascade`): the latest decision's threshold and the
bound it achieved (with its interval and the method), the rows kept, sampled and sent to the oracle,
the incremental runs that reused it, and the cost against running the oracle on every row: the money
spent by both models since the proxy's first answer of the population, against the oracle's cost per
row answered (from its own paid requests) times the rows. Where the oracle cost nothing (a local model,
prices of 0, every answer from the cache), the share of rows it answered stands in.
"""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass, field
from typing import Any

from llmap.control.guarantee import Choice
from llmap.observe import svg
from llmap.store.cascade import CascadeBook, Decision
from llmap.store.ledger import Ledger

__all__ = ["CascadeSummary", "cascade_html", "cascade_lines", "cascade_summary"]


@dataclass
class CascadeSummary:
    """A guaranteed cascade's state (see the module docstring).

    Attributes:
        decision: the latest decision.
        rows: rows of the latest plan in its population.
        kept, sampled, escalated: of those, rows the threshold keeps (the proxy's answer), rows in the
            sample, and the other rows sent to the oracle; ``done`` per group: rows already settled.
        proxy, oracle: the models (``provider:name``).
        proxy_cost, oracle_cost: USD spent on each since the population's first proxy answer.
        oracle_rows_paid: rows the oracle answered in those paid requests.
        all_oracle_cost: the oracle's cost per row answered times ``rows``, or None when it cost nothing.
        oracle_share: rows whose answer is the oracle's (sampled and escalated), as a share of ``rows``.
    """

    decision: Decision
    rows: int = 0
    kept: int = 0
    sampled: int = 0
    escalated: int = 0
    done: dict[str, int] = field(default_factory=dict)
    proxy: str = ""
    oracle: str = ""
    proxy_cost: float = 0.0
    oracle_cost: float = 0.0
    oracle_rows_paid: int = 0
    all_oracle_cost: float | None = None
    oracle_share: float | None = None

    @property
    def choice(self) -> Choice | None:
        return self.decision.choice

    @property
    def cost_ratio(self) -> float | None:
        """Money spent by the cascade over what the oracle on every row would cost, or None."""
        if not self.all_oracle_cost:
            return None
        return (self.proxy_cost + self.oracle_cost) / self.all_oracle_cost

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (``llmap status --json``'s ``cascade``)."""
        d = asdict(self)
        dec = d.pop("decision")
        d["decision"] = {k: dec[k] for k in ("id", "run", "state", "threshold", "population", "sample", "settings",
                                             "reuses")}
        d["decision"]["choice"] = self.choice.as_dict() if self.choice is not None else None
        d["cost_ratio"] = self.cost_ratio
        return d


def cascade_summary(ledger: Ledger, plan: int) -> CascadeSummary | None:
    """The latest decision of the ledger and its rows in ``plan``, or None (no cascade)."""
    db = ledger.connection
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'cascade_decisions'").fetchone() is None:
        return None
    book = CascadeBook(ledger)
    decision = book.latest()
    if decision is None:
        return None
    s = CascadeSummary(decision, proxy=str(decision.settings.get("proxy", "")),
                       oracle=str(decision.settings.get("oracle", "")))
    done: dict[str, int] = {"kept": 0, "sampled": 0, "escalated": 0}
    for sampled, keep, status, n in db.execute(
            "SELECT c.sampled, c.keep, r.status, count(*) FROM cascade_rows c JOIN rows r ON r.key = c.key AND "
            "r.input_hash = c.input_hash WHERE r.plan = ? AND c.decision = ? GROUP BY c.sampled, c.keep, r.status",
            (plan, decision.id)):
        group = "sampled" if sampled else "kept" if keep == 1 else "escalated"
        setattr(s, group, getattr(s, group) + n)
        s.rows += n
        if status != "pending":
            done[group] += n
    s.done = done
    _costs(db, s)
    return s


def _costs(db: sqlite3.Connection, s: CascadeSummary) -> None:
    first = db.execute("SELECT min(run) FROM cascade_rows WHERE decision = ?", (s.decision.id,)).fetchone()[0]
    if first is None:
        return
    for model, cost, rows in db.execute(
            "SELECT model, coalesce(sum(cost_usd), 0), coalesce(sum(CASE WHEN outcome = '200' THEN pack_size END), 0) "
            "FROM requests WHERE run >= ? AND model IN (?, ?) GROUP BY model", (first, s.proxy, s.oracle)):
        if model == s.proxy:
            s.proxy_cost = float(cost)
        if model == s.oracle:
            s.oracle_cost, s.oracle_rows_paid = float(cost), int(rows or 0)
    if s.oracle_rows_paid and s.oracle_cost > 0:
        s.all_oracle_cost = s.oracle_cost / s.oracle_rows_paid * s.rows
    if s.rows:
        s.oracle_share = (s.sampled + s.escalated) / s.rows


def cascade_lines(s: CascadeSummary) -> list[str]:
    """The summary as lines of text (``llmap status`` and ``llmap report``)."""
    d, c = s.decision, s.choice
    st = d.settings
    head = (f"cascade: {st.get('guarantee')} on {st.get('field')!r} >= {st.get('target'):g} with probability >= "
            f"{1 - float(st.get('delta', 0)):g}; proxy {s.proxy}, oracle {s.oracle}")
    lines = [head]
    if d.state == "sampling":
        lines.append(f"  sample: {d.sample:,} of {d.population:,} rows drawn in run {d.run} (seed {st.get('seed')}); "
                     f"the oracle has answered {s.done.get('sampled', 0):,} of them; no threshold yet")
    elif c is not None and c.met:
        lines.append(f"  threshold {c.threshold:.4g} (run {d.run}, from {d.sample:,} sampled rows): {c.guarantee} >= "
                     f"{c.bound:.4f}, interval [{c.bound:.4f}, {c.upper:.4f}], estimate {c.estimate:.4f}")
        lines.append(f"  method: {c.method}; {c.candidates:,} thresholds tested")
    elif c is not None:
        lines.append(f"  no threshold met the target from {d.sample:,} sampled rows (run {d.run}): every row goes to "
                     "the oracle, or the run stops ([cascade] on_miss)")
    if d.state != "sampling":
        lines.append(f"  rows: {s.kept:,} kept (the proxy's answer), {s.sampled:,} sampled, {s.escalated:,} escalated "
                     f"to the oracle, of {s.rows:,}; settled: {sum(s.done.values()):,}")
    if s.cost_ratio is not None:
        lines.append(f"  cost: ${s.proxy_cost + s.oracle_cost:,.4f} (proxy ${s.proxy_cost:,.4f}, oracle "
                     f"${s.oracle_cost:,.4f}) against ~${s.all_oracle_cost:,.4f} for the oracle on every row: "
                     f"{s.cost_ratio:.1%}")
    elif s.oracle_share is not None and d.state != "sampling":
        lines.append(f"  cost: the oracle answers {s.oracle_share:.1%} of rows (no cost per row to compare: the "
                     f"oracle's answers cost $0 here); proxy ${s.proxy_cost:,.4f}")
    for r in d.reuses:
        lines.append(f"  reused by run {r.get('run')}: {r.get('changed', 0):,} changed rows ({r.get('kept', 0):,} "
                     f"kept, counted as wrong): bound {float(r.get('bound', 0)):.4f}")
    return lines


def cascade_html(s: CascadeSummary) -> str:
    """The HTML report's cascade section (a table, no script)."""
    e = svg.esc
    lines = cascade_lines(s)
    c = s.choice
    cells = [("Threshold", f"{c.threshold:.4g}" if c is not None and c.threshold is not None else "none"),
             ("Bound (1 − δ)", f"{c.bound:.4f}" if c is not None and c.bound is not None else "-"),
             ("Interval", f"[{c.bound:.4f}, {c.upper:.4f}]" if c is not None and c.met else "-"),
             ("Estimate", f"{c.estimate:.4f}" if c is not None and c.estimate is not None else "-"),
             ("Rows kept / sampled / escalated", f"{s.kept:,} / {s.sampled:,} / {s.escalated:,} of {s.rows:,}"),
             ("Cost against the oracle on every row",
              f"{s.cost_ratio:.1%}" if s.cost_ratio is not None else
              (f"oracle on {s.oracle_share:.1%} of rows" if s.oracle_share is not None else "-"))]
    rows = "".join(f"<tr><th>{e(k)}</th><td class=\"n\">{e(v)}</td></tr>" for k, v in cells)
    return f"<p>{e(lines[0])}</p><table>{rows}</table>" + "".join(f"<p>{e(x.strip())}</p>" for x in lines[1:])
