"""What a run would cost, before it sends anything: rows, requests, tokens, USD and time.

:func:`estimate` walks the input the way the planner and the dispatcher do
(the same row keys, input hashes, rendered messages and cache keys) and sorts
every row into exactly one bucket, in this order:

1. ``done``: the ledger holds the row ``done`` with the same input hash;
2. ``skipped``: every template input is empty;
3. ``duplicates``: an earlier row of this input makes the identical request
   (the run sends it once and shares the answer);
4. ``cached``: the response cache holds a fresh answer for the primary model;
5. ``to_request``: the rest, one request each (``pack = N``: N rows a request).

Nothing is sent and nothing is written: no provider is built (a local model is
not loaded), no endpoint is called, and the ledger and the response cache are
opened read-only, only when their files exist. The cache is read with plain
SQL rather than :meth:`~llmap.store.cache.ResponseCache.get_many`, which counts
every lookup as a hit and would make ``llmap cache stats`` report answers that
an estimate never served.

Tokens: prompt tokens are the rendered messages' characters divided by a
characters-per-token ratio (4.0, or the ratio observed on done rows of the
ledger); completion tokens per row are the mean of past answers of that model
(the ledger's ``requests`` log), else ``max_tokens`` (an upper bound). Every
figure says where it comes from (the ``*_source`` attributes). Tokens become
USD and time in :mod:`llmap.observe.estimate.cost` (prompt-cache reads
included for models with ``prompt_cache``).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jinja2.meta
import pyarrow as pa

from llmap.io.documents import Documents
from llmap.io.sources import Source
from llmap.observe.estimate.cost import (
    Estimate,
    History,
    ModelCost,
    cost_and_time,
)
from llmap.observe.estimate.images import image_tokens
from llmap.plan import Compiled, build_source, check_input, compile_spec, keyed_rows
from llmap.prompt.render import Renderer
from llmap.spec import JobSpec, ModelSpec
from llmap.store.answers import AnswerCache
from llmap.store.cache import FILE_NAME, ResponseCache, default_cache_dir

__all__ = ["Estimate", "ModelCost", "estimate"]

#: Done rows rendered to learn the characters-per-token ratio (enough for a stable mean).
_CALIBRATION_ROWS = 2000
#: Cache keys per lookup batch (the cache query itself goes 500 keys per ``IN`` list).
_LOOKUP_BATCH = 2000
#: Rows whose fast rendering (user template only) is checked against the general path before it is trusted.
_VERIFY_ROWS = 32


# -- read-only history ----------------------------------------------------------------
def _connect_ro(path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, check_same_thread=False)
    con.execute("PRAGMA busy_timeout = 5000")
    return con


def _read_history(path: Path, primary: str) -> History | None:
    """Done rows and past usage from the ledger, or None when there is no ledger."""
    if not path.is_file():
        return None
    h = History()
    con = _connect_ro(path)
    try:
        try:
            for key, ih, tokens in con.execute(
                "SELECT key, input_hash, CASE WHEN source = 'model' AND attempts = 1 AND model = ? "
                "THEN prompt_tokens END FROM rows WHERE status = 'done'", (primary,)):
                h.done[key] = ih
                if tokens:
                    h.calib[key] = tokens
        except sqlite3.OperationalError:  # a ledger from before these columns: no history to use
            pass
        try:
            for model, ct, items, lat in con.execute(
                "SELECT model, sum(completion_tokens), sum(pack_size), avg(latency_s) FROM requests "
                "WHERE outcome = '200' GROUP BY model"):
                if items:
                    h.completion[model] = (ct or 0) / items
                if lat is not None:
                    h.latency[model] = lat
        except sqlite3.OperationalError:
            pass
    finally:
        con.close()
    return h


# -- requests, as the dispatcher would build them --------------------------------------
class _RequestKeys:
    """A row's cache key on the primary model and its prompt characters.

    The general path is :meth:`Renderer.messages` + :meth:`AnswerCache.key`.
    When the system prompt reads no column, the messages before the row's user
    prompt are the same for every row, so only the user template is rendered
    and the key comes from :meth:`AnswerCache.user_keyer` (the same key, built
    around the user message), and the user template is rendered through Jinja2's
    public ``new_context(shared=True)`` with its globals merged in once (Jinja2
    merges them per render otherwise): 5x faster. The first rows' rendering is
    checked against the general path; any difference or error turns the fast
    path off.
    """

    def __init__(self, renderer: Renderer, model: ModelSpec, schema: dict[str, Any], system_src: str | None) -> None:
        self.renderer = renderer
        self.model = model
        self.schema = schema
        static = system_src is None or not jinja2.meta.find_undeclared_variables(
            renderer.user.environment.parse(system_src))
        self.fast = static
        self._verify = _VERIFY_ROWS
        self._keyer: Callable[[str], str] | None = None
        self._head_chars = 0
        self._globals = dict(renderer.user.globals)

    def _prepare(self, row: Mapping[str, Any]) -> None:
        head = self.renderer.messages(row)[:-1]
        self._keyer = AnswerCache.user_keyer(self.model, head, self.schema)
        self._head_chars = sum(len(x["content"]) for x in head)

    def slow(self, row: Mapping[str, Any]) -> tuple[str, int]:
        msgs = self.renderer.messages(row)
        return AnswerCache.key(self.model, msgs, self.schema), sum(len(x["content"]) for x in msgs)

    def _fast(self, row: Mapping[str, Any]) -> tuple[str, int]:
        r = self.renderer
        u = r.user
        ctx = u.new_context({**self._globals, **(r.cut(row) if r.max_chars else row)}, shared=True)
        content = u.environment.concat(u.root_render_func(ctx))
        return self._keyer(content), self._head_chars + len(content)

    def __call__(self, row: Mapping[str, Any]) -> tuple[str, int]:
        if not self.fast:
            return self.slow(row)
        if self._keyer is None:
            self._prepare(row)
        if not self._verify:
            return self._fast(row)
        self._verify -= 1
        want = self.slow(row)
        try:
            got = self._fast(row)
        except Exception:
            got = None
        if got != want:
            self.fast = False
        return want


_JSON_SAFE = (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer, pa.types.is_floating,
              pa.types.is_boolean, pa.types.is_null)


def _json_safe(schema: pa.Schema) -> bool:
    """Whether rows of this schema come back from the ledger's JSON unchanged (no dates, decimals, ...)."""
    return all(any(t(f.type) for t in _JSON_SAFE) for f in schema)


# -- the estimate ------------------------------------------------------------------------
def estimate(spec: JobSpec, *, limit: int | None = None, source: Source | None = None) -> Estimate:
    """Estimate rows, requests, tokens, USD and time of running the job now, sending nothing.

    Args:
        spec: the job; its ledger and the response cache are read if they exist.
        limit: optional cap on input rows, as ``llmap run --limit``.
        source: an input built by the caller (an in-memory table); default ``[input]``.

    Returns:
        An :class:`Estimate`; ``elapsed_s`` is how long the estimate took.

    Raises:
        SpecError: the input lacks a column the job names, ``where`` fails, or
            keys are empty or repeated (the same checks as a run's preflight).
    """
    started = time.perf_counter()
    model = spec.model
    compiled = compile_spec(spec)
    compiled.close()  # the cascade conditions are not evaluated here
    if compiled.documents is not None:  # documents are counted from what is stored: nothing fetched or written
        compiled.documents.readonly = True
    given = source
    source = build_source(spec, limit=limit, given=given)
    est = Estimate(pack=spec.prompt.pack)
    try:
        columns = check_input(spec, compiled, source).data_columns
        hist = _read_history(spec.ledger_path, model.label)
        est.ledger_found = hist is not None
        hist = hist or History()
        probe = None
        cache_path = default_cache_dir() / FILE_NAME
        if not spec.cache.enabled:
            est.cache_source = "[cache] enabled = false"
        elif not cache_path.is_file():
            est.cache_source = "no response cache yet"
        else:
            probe = ResponseCache(cache_path, ttl_s=spec.cache.ttl_s, readonly=True)
            est.cache_source = f"response cache {cache_path}"
        try:
            calib_chars, calib_tokens, calib_rows = _walk(spec, compiled, source, columns, hist, probe, est)
        finally:
            if probe is not None:
                probe.close()
    finally:
        if given is None:
            source.close()
        if compiled.documents is not None:
            compiled.documents.close()
    if calib_tokens:
        est.chars_per_token = min(16.0, max(0.5, calib_chars / calib_tokens))
        est.chars_per_token_source = f"ledger ({calib_rows} done rows)"
    cost_and_time(est, spec, hist)
    est.elapsed_s = time.perf_counter() - started
    return est


def _with_documents(docs: Documents, row: dict[str, Any], spec: JobSpec, est: Estimate) -> dict[str, Any]:
    """``row`` with each document cell replaced by what it would send: its stored text; for an image part,
    nothing (its tokens go to ``est.image_tokens``); for a document never read, a stand-in as long as its
    ``max_tokens`` (an upper bound, unique to the document so that duplicates still count once)."""
    out = dict(row)
    for column, dspec in docs.columns.items():
        text, image = docs.known(column, row.get(column))
        if image is not None:
            est.images += 1
            est.image_tokens += image_tokens(spec.model, *image)
        elif text is None:
            est.documents_unread += 1
            ident = str(docs.identity(column, row.get(column)))
            text = ident.ljust(dspec.max_tokens * 4)
        out[column] = text
    return out


def _walk(spec: JobSpec, compiled: Compiled, source: Source, columns: list[str], hist: History,
          probe: ResponseCache | None, est: Estimate) -> tuple[int, int, int]:
    """Sort every row into its bucket (see the module docstring); returns calibration (chars, tokens, rows)."""
    renderer = compiled.renderer
    schema = compiled.schema.json_schema
    variables = renderer.variables
    dumps_row = json.JSONEncoder(ensure_ascii=False, default=str).encode
    keys = _RequestKeys(renderer, spec.model, schema, spec.prompt.system)
    done, calib = hist.done, hist.calib
    seen_inputs: set[str] = set()  # input hashes already keyed: identical inputs render identical requests
    seen_keys: set[str] = set()
    waiting: list[tuple[str, int]] = []  # (cache key, prompt chars) to look up
    calib_chars = calib_tokens = calib_rows = 0
    prefix_unknown = True

    def lookup() -> None:
        fresh = set(probe.get_many([k for k, _ in waiting], count_hits=False)) if probe is not None else set()
        for k, chars in waiting:
            if k in fresh:
                est.cached += 1
            else:
                est.to_request += 1
                est.prompt_chars += chars
        waiting.clear()

    last_schema, roundtrip = None, False
    for r in keyed_rows(spec, compiled, source, columns):
        est.rows += 1
        if r.batch_schema is not last_schema:
            last_schema, roundtrip = r.batch_schema, not _json_safe(r.batch_schema)
        key, row, inputs, h = r.key, r.row, r.inputs, r.input_hash
        if done.get(key) == h:
            est.done += 1
            if calib_rows < _CALIBRATION_ROWS and key in calib:
                calib_rows += 1
                calib_tokens += calib[key]
                calib_chars += keys(json.loads(dumps_row(row)) if roundtrip else row)[1]
            continue
        if variables and all(v is None or v == "" for v in inputs.values()):
            est.skipped += 1
            continue
        if h in seen_inputs:
            est.duplicates += 1
            continue
        seen_inputs.add(h)
        # The dispatcher renders the row as stored in the ledger: JSON text, read back.
        row = json.loads(dumps_row(row)) if roundtrip else row
        if compiled.documents is not None:
            row = _with_documents(compiled.documents, row, spec, est)
        ckey, chars = keys(row)
        if calib_rows < _CALIBRATION_ROWS and key in calib:  # answered before, with another prompt or input:
            calib_rows += 1  # its tokens still tell this model's characters per token (its chat template, language)
            calib_tokens += calib[key]
            calib_chars += chars
        if ckey in seen_keys:
            est.duplicates += 1
            continue
        seen_keys.add(ckey)
        if prefix_unknown:
            prefix_unknown = False
            if not renderer.system_variables:  # then the messages before the row's own are every row's
                est.prefix_chars = sum(len(m["content"]) for m in renderer.messages(row)[:-1])
        waiting.append((ckey, chars))
        if len(waiting) >= _LOOKUP_BATCH:
            lookup()
    lookup()
    return calib_chars, calib_tokens, calib_rows


