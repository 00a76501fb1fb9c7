"""The steps every way of settling pending rows shares: prepare, answer from memory, solve.

The worker pool (:mod:`llmap.run.pool`), the batch path's real-time side
(:mod:`llmap.run.batch.context`), the Ray workers (:mod:`llmap.run.ray.worker`)
and Ray Data's mappers (:mod:`llmap.run.ray.data`) all run these steps; none
keeps a copy:

0. :meth:`RowSteps.resolve`: read each row's documents (``[input.documents]``,
   :mod:`llmap.io.documents`) into its data; a document that cannot be read
   fails its row alone.
1. :meth:`RowSteps.prepare`: render each row's messages and key its request on
   the primary model (the response cache's key). A row whose template fails
   on its own values fails alone, with the error naming the column; the same
   template error on the first rows, with no NULL to blame, is the
   template's: the run stops and says so.
2. :meth:`RowSteps.from_cache`: a stored answer settles the row, unless it
   meets the primary model's ``escalate_if`` (then the row goes on alone);
   :meth:`RowSteps.answer` does it for many rows at once (a Ray worker's lease).
3. :meth:`RowSteps.solve`: settle a pack of rows (or one row) through the
   :class:`~llmap.run.packer.Packer` or the
   :class:`~llmap.run.dispatch.Dispatcher`, containing its exception: a row's
   bad value or a bug fails those rows and the caller goes on; a stopping run
   leaves them pending.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llmap.control.misconfig import mask_numbers
from llmap.errors import DiskFull, DocumentError, RenderError
from llmap.run.dispatch import Dispatcher
from llmap.run.packer import Packer
from llmap.run.settle import Tries, error_text
from llmap.run.stats import Stop
from llmap.store.cache import CacheEntry
from llmap.store.ledger import RowResult

__all__ = ["DOCUMENT_PAGE_ROWS", "TEMPLATE_ERRORS_TO_STOP", "PendingRow", "RowSteps"]

#: The first rows all failing to render with one identical error (no NULL involved) stop the run.
TEMPLATE_ERRORS_TO_STOP = 3
#: Rows paged out of the ledger at a time when they carry documents (read before their requests go out).
DOCUMENT_PAGE_ROWS = 32


@dataclass(slots=True)
class PendingRow:
    """A pending row on its way to a request.

    Attributes:
        key: the row's key.
        data: its ledger data (JSON text of column -> value); empty where the caller holds ``row``.
        group: its ``per_group`` quota group, or None.
        row: column -> value, once prepared.
        messages: the rendered chat messages, once prepared.
        ckey: the response cache key of its request on the primary model, once prepared
            (None without a cache).
        single: a cached answer that escalates (a cascade): it is sent alone, and the
            dispatcher takes the cached answer on to the next model.
        input_hash: the row's input hash in the ledger, where the caller needs it (a batch line
            records it, so a row whose inputs changed while its batch ran is not settled by it).
        resolved_hash: its input hash over its documents' content, once :meth:`RowSteps.resolve`
            read them; the pool records it with the row's result.
    """

    key: str
    data: str
    group: Any = None
    row: dict[str, Any] | None = None
    messages: list[dict[str, str]] | None = None
    ckey: str | None = None
    single: bool = False
    input_hash: str | None = None
    resolved_hash: str | None = None


class RowSteps:
    """The shared steps over one dispatcher (see the module docstring).

    Args:
        dispatcher: renders (its renderer), keys (its answer cache), sends and settles.
        packer: packs of rows (``[prompt] pack``), or None for one row per request.
    """

    def __init__(self, dispatcher: Dispatcher, packer: Packer | None = None) -> None:
        self.d = dispatcher
        self.packer = packer
        self._rendered = False  # a row has rendered: template errors are the rows' own from now on
        self._render_errors: list[str] = []

    def page_rows(self, rows: int) -> int:
        """How many rows to page out at a time: ``rows``, or :data:`DOCUMENT_PAGE_ROWS` when rows carry
        documents (a page's documents are read before its first request goes out)."""
        return min(rows, DOCUMENT_PAGE_ROWS) if getattr(self.d, "documents", None) is not None else rows

    # -- 0. resolve documents ----------------------------------------------------------------
    async def resolve(self, rows: Sequence[PendingRow]) -> tuple[list[PendingRow], list[tuple[RowResult, PendingRow]]]:
        """Read the rows' documents (the dispatcher's ``documents``) into their data, all rows at once.

        Returns:
            ``(ready, failed)``: the rows whose documents were read (``data`` now holds the text,
            ``row`` is reset, ``resolved_hash`` is set), and a failed result for each row with a
            document that could not be read (or any other error on the way), paired with the row.
            Without document columns every row is ready, unchanged.

        Raises:
            DiskFull: the document store's disk is full.
        """
        docs = getattr(self.d, "documents", None)
        if docs is None or not rows:
            return list(rows), []
        got = await asyncio.gather(*(docs.resolve_data(r.data) for r in rows), return_exceptions=True)
        ready: list[PendingRow] = []
        failed: list[tuple[RowResult, PendingRow]] = []
        for r, res in zip(rows, got, strict=True):
            if isinstance(res, DiskFull | asyncio.CancelledError):
                raise res
            if isinstance(res, BaseException):
                error = str(res) if isinstance(res, DocumentError) else error_text(res)
                failed.append((RowResult(r.key, "failed", error=error), r))
                continue
            data, resolved = res
            if resolved is not None:
                r.data, r.row, r.resolved_hash = data, None, resolved
            ready.append(r)
        return ready, failed

    # -- 1. prepare ------------------------------------------------------------------------
    def prepare(self, rows: Iterable[PendingRow], *, look_ahead: bool = True, keyed: bool | None = None
                ) -> tuple[list[PendingRow], list[tuple[RowResult, PendingRow]]]:
        """Render rows and key their requests on the primary model.

        Rows with ``row`` set are rendered from it; the others from ``data``. With ``look_ahead``,
        the rows that rendered are keyed and their keys looked up in the response cache ahead, in
        one query (:meth:`~llmap.store.answers.AnswerCache.prefetch`; each row is then taken with
        :meth:`~llmap.store.answers.AnswerCache.peek` or ``pass_over``); without it (a row the
        dispatcher looks up itself), ``ckey`` stays None unless ``keyed`` (the caller looks the keys
        up elsewhere: a Ray worker asks the cache actor, then :meth:`answer`). Stops early (the rest
        stay pending) once the run is stopping.

        Returns:
            ``(ready, failed)``: the rows that rendered, and a failed result for each row whose
            template failed on its values (paired with the row).
        """
        d = self.d
        answers = d.answers if look_ahead or keyed else None
        look_ahead = look_ahead and answers is not None
        primary = d.lanes[0]
        schema = d.schema.json_schema
        ready: list[PendingRow] = []
        failed: list[tuple[RowResult, PendingRow]] = []
        for r in rows:
            if d.stats.stop.is_set():
                break
            if r.row is None:
                r.row = json.loads(r.data)
            try:
                r.messages = d.renderer.messages(r.row)
            except RenderError as exc:
                failed.append((RowResult(r.key, "failed", error=str(exc)), r))
                self._template_failed(exc)
                continue
            self._rendered = True
            if answers is not None:
                r.ckey = answers.key(primary.model, r.messages, schema)
            ready.append(r)
        if look_ahead:
            answers.prefetch([r.ckey for r in ready])
        return ready, failed

    def _template_failed(self, exc: RenderError) -> None:
        """The same template error on the first rows, with no NULL to blame, is the template's: stop."""
        if self._rendered or exc.null_columns:
            return
        self._render_errors.append(mask_numbers(str(exc)))
        if len(self._render_errors) >= TEMPLATE_ERRORS_TO_STOP and len(set(self._render_errors)) == 1:
            self.d.stats.halt(f"the prompt template fails the same way on every row ({exc}); fix [prompt] and "
                              "run again")

    # -- 2. answer from memory --------------------------------------------------------------------
    async def from_cache(self, row: PendingRow, entry: CacheEntry) -> RowResult | None:
        """The row settled by a stored answer, or None when the answer meets the primary model's
        ``escalate_if`` or breaks an ``[output] checks`` rule on this row's columns (then ``row.single`` is set:
        it goes on alone, as a cascade, or to the model, whose answer is re-asked with the check's message)."""
        if await self.d.settler.escalates(0, entry.output) or not await self.d.settler.accepts(entry.output, row.row):
            row.single = True  # a cascade, or an answer that breaks a check on this row: it goes alone
            return None
        return cached(row.key, entry)

    async def answer(self, rows: Sequence[PendingRow], found: Mapping[str, CacheEntry]
                     ) -> tuple[list[tuple[RowResult, PendingRow]], list[PendingRow]]:
        """Settle keyed rows from stored answers looked up elsewhere (:meth:`from_cache` for each).

        Args:
            rows: prepared rows, keyed (``ckey`` set).
            found: cache key -> stored answer, for the keys found.

        Returns:
            ``(answered, todo)``: each row settled by its stored answer (paired with the row), and the
            rows left to send, in order (a row whose stored answer escalates is marked ``single``).
        """
        answered: list[tuple[RowResult, PendingRow]] = []
        todo: list[PendingRow] = []
        for r in rows:
            hit = found.get(r.ckey) if found and r.ckey is not None else None
            res = await self.from_cache(r, hit) if hit is not None else None
            if res is None:
                todo.append(r)
            else:
                answered.append((res, r))
        return answered, todo

    # -- 3. solve ------------------------------------------------------------------------------
    async def solve(self, items: Sequence[PendingRow]) -> list[RowResult] | None:
        """Settle one pack of rows (or one row); results in the order of ``items``.

        Returns:
            The results, or None when the run is stopping (the rows stay pending). Any exception
            but a full disk fails these rows with it (one row's bad value, or a bug): the caller
            goes on.

        Raises:
            DiskFull: a cache write on the rows' path found the disk full.
        """
        try:
            if self.packer is not None and not items[0].single:
                return await self.packer.solve([(r.key, r.row, r.messages, r.ckey) for r in items])
            row = items[0]
            return [await self.d.solve_messages(row.key, row.messages, lead=None if row.single else row.ckey,
                                                row=row.row)]
        except Stop:
            return None
        except DiskFull:
            raise
        except Exception as exc:
            return [RowResult(r.key, "failed", error=error_text(exc)) for r in items]

    async def solve_row(self, row: PendingRow, *, start: int = 0, lead: str | None = None,
                        extra: Sequence[dict[str, str]] = (), tries: Tries | None = None,
                        tried: list | None = None) -> RowResult | None:
        """Settle one row from model ``start`` on, after what happened to it elsewhere (a batch).

        Args:
            row: a prepared row.
            start: the first model: 0 to retry, 1 to fail over or cascade past the first.
            lead: the row's cache key on model ``start``, when nothing holds it.
            extra, tries: a re-ask decided elsewhere (:meth:`Dispatcher.solve_messages`).
            tried: answers met before; when one ``escalated``, the row cascades and keeps that
                answer should every later model fail.

        Returns:
            The result, or None when the run is stopping (the row stays pending). Any exception but
            a full disk fails the row with it.
        """
        try:
            return await self.d.solve_messages(row.key, row.messages, start=start, lead=lead, extra=extra,
                                               tries=tries, tried=tried or (), row=row.row)
        except Stop:
            return None
        except DiskFull:
            raise
        except Exception as exc:
            return RowResult(row.key, "failed", error=error_text(exc))


def cached(key: str, entry: CacheEntry) -> RowResult:
    """A row settled by a stored answer (the response cache, or an identical request of this run)."""
    return RowResult(key, "done", output=entry.output, model=entry.model, source="cache",
                     tried=[(entry.model, "cache", entry.output, 0, 0)], confidence=entry.confidence)
