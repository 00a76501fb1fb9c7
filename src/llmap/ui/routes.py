"""The page's routes, all under ``/<token>/`` (the guard in :mod:`llmap.ui.safety` checks it first).

=========================  ====  ==========================================================================
path                       verb  what
=========================  ====  ==========================================================================
``/``                      GET   the page, with the row counts and the first page of rows in its HTML
``static/{name}``          GET   its script and style sheet (from the package, no CDN)
``api/meta``               GET   the job: fields, kept columns, group column, what the ledger supports
``api/summary``            GET   the live figures (:mod:`llmap.ui.live`)
``api/events``             GET   the live figures as server-sent events, one per change
``api/rows``               GET   a page of rows: filters, sort, paging (:mod:`llmap.ui.queries`)
``api/row``                GET   one row whole (``?key=``; :mod:`llmap.ui.detail`)
``api/review``             GET   a seeded, stratified review sample (``?n=&seed=&field=&stratify=``)
``api/eval``               GET   eval's figures from the labels
``api/requeue``            GET   how many rows a re-queue would move (the confirmation's text)
``api/label``              POST  a label: ``{key, field, value}``
``api/stop``               POST  stop the run (SIGTERM to its process)
``api/requeue``            POST  re-queue the rows a filter selects, or the failed ones
``api/rollback``           POST  roll back a run ``{run}`` as ``llmap rollback`` does, then export
=========================  ====  ==========================================================================

Every JSON answer goes through the job's :class:`~llmap.ui.safety.Redactor`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from llmap.io.sinks import export_job
from llmap.store.ledger import STATUSES
from llmap.ui import actions, quality
from llmap.ui.detail import row_detail
from llmap.ui.queries import RowQuery, iter_keys, ledger_page, page, read_rows

__all__ = ["add_routes"]

STATIC = Path(__file__).parent / "static"
#: The files ``static/`` serves, with their content types.
ASSETS = {"app.js": "text/javascript", "app.css": "text/css"}
#: Rows in the page's HTML (the table's first page).
FIRST_PAGE = 50
#: Rows a review sample holds at most.
MAX_SAMPLE = 1000

_templates = jinja2.Environment(loader=jinja2.FileSystemLoader(STATIC), autoescape=True,
                                undefined=jinja2.StrictUndefined)


def _json(state: Any, data: Any, status: int = 200) -> web.Response:
    body = json.dumps(state.redactor.data(data), ensure_ascii=False, default=str, allow_nan=False)
    return web.json_response(text=body, status=status)


def _fail(state: Any, message: str, status: int = 400) -> web.Response:
    return _json(state, {"error": message}, status)


def meta(state: Any) -> dict[str, Any]:
    """What the page needs to know of the job once."""
    spec = state.spec
    fields = [{"name": n, "type": f.type, "enum": f.enum} for n, f in spec.output.fields.items()]
    rollback = state.features["rollback"]
    key = spec.input.key or "_row"
    # the table shows the kept columns (else the template's) beside the key
    cols = [c for c in (spec.output.keep or state.data_columns) if c not in (key, "_row")]
    return {
        "job": spec.name, "key": key, "fields": fields, "keep": list(spec.output.keep), "cols": cols,
        "data_columns": state.data_columns, "group": state.group, "statuses": list(STATUSES),
        "features": state.features, "models": list(state.models), "pack": spec.prompt.pack,
        "rollback": {"enabled": rollback,
                     "why": None if rollback else "this ledger was written by an llmap without rollback (it keeps "
                     "no row history yet); runs from the next one on can be rolled back"},
        "labels": {"enabled": state.features["labels"],
                   "why": None if state.features["labels"] else "no labels yet: this ledger has no labels table "
                   "(it comes with `llmap label` and `llmap eval`)"},
    }


def _rows_page(state: Any, q: RowQuery) -> dict[str, Any]:
    t0 = time.perf_counter()
    plan = state.plan()
    if state.index.ready and not state.index.behind:
        result = page(state.index, state.index_reader(), plan, q)
    else:
        result = ledger_page(state.ledger(), state.columns, plan, q)
    rows = read_rows(state.ledger(), result.keys, confidence=state.features["confidence"])
    return {"rows": rows, "total": result.total, "capped": result.capped, "sorted": result.sorted,
            "indexed": result.indexed, "offset": q.offset, "limit": q.limit, "plan": plan,
            "ms": round((time.perf_counter() - t0) * 1000, 1)}


def _first_paint(state: Any) -> dict[str, Any]:
    """The counts and first page in the HTML: straight from the ledger (its own indexes), no wait for ours."""
    db = state.ledger()
    plan = state.plan()
    counts = dict.fromkeys(STATUSES, 0)
    for status, n in db.execute("SELECT status, count(*) FROM rows WHERE plan = ? GROUP BY status", (plan,)):
        counts[status] = n
    keys = [k for (k,) in db.execute("SELECT key FROM rows WHERE plan = ? ORDER BY seq LIMIT ?", (plan, FIRST_PAGE))]
    total = sum(counts.values())
    return {"counts": counts, "total": total, "rows": read_rows(db, keys, confidence=state.features["confidence"]),
            "page": {"total": total, "capped": False, "sorted": True, "indexed": False, "offset": 0,
                     "limit": FIRST_PAGE, "plan": plan}}


def add_routes(app: web.Application, state: Any) -> None:
    """Register the routes of the module docstring on ``app`` for ``state`` (a :class:`~llmap.ui.server.UiState`)."""
    base = f"/{state.token}"
    changed = {"event": asyncio.Event()}

    async def on_startup(_app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        changed["event"] = asyncio.Event()

        def wake() -> None:
            old, changed["event"] = changed["event"], asyncio.Event()
            old.set()

        state.on_change(lambda: loop.call_soon_threadsafe(wake))

    app.on_startup.append(on_startup)

    async def index_page(request: web.Request) -> web.Response:
        first = await state.run(_first_paint, state)
        m = meta(state)
        boot = state.redactor.data({"meta": m, "first": first, "summary": state.live.summary() or None})
        fields = [f["name"] for f in m["fields"]]
        html = _templates.get_template("index.html").render(
            base=f"{base}/", csrf=state.csrf, job=state.spec.name, counts=first["counts"], total=first["total"],
            rows=boot["first"]["rows"], cols=m["cols"], key=m["key"], fields=fields, statuses=STATUSES, boot=boot)
        return web.Response(text=html, content_type="text/html", charset="utf-8")

    async def static(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in ASSETS:
            raise web.HTTPNotFound()
        return web.Response(body=(STATIC / name).read_bytes(), content_type=ASSETS[name], charset="utf-8")

    async def api_meta(request: web.Request) -> web.Response:
        return _json(state, meta(state))

    async def api_summary(request: web.Request) -> web.Response:
        return _json(state, {**(state.live.summary() or {}), "message": state.message})

    async def api_events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        last = -1
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while True:
                event = changed["event"]
                if state.live.version != last and state.live.summary():
                    last = state.live.version
                    data = json.dumps(state.redactor.data({**state.live.summary(), "message": state.message}),
                                      default=str, allow_nan=False)
                    await resp.write(f"data: {data}\n\n".encode())
                try:
                    await asyncio.wait_for(event.wait(), timeout=15)
                except TimeoutError:
                    await resp.write(b": keep-alive\n\n")
        return resp

    async def api_rows(request: web.Request) -> web.Response:
        types = {n: f.type for n, f in state.spec.output.fields.items()}
        try:
            q = RowQuery.from_params(request.query, state.columns, types)
        except ValueError as exc:
            return _fail(state, str(exc))
        return _json(state, await state.run(_rows_page, state, q))

    async def api_row(request: web.Request) -> web.Response:
        key = request.query.get("key")
        if key is None:
            return _fail(state, "api/row needs ?key=")
        found = await state.run(lambda: row_detail(state.ledger(), key, renderer=state.renderer, models=state.models,
                                                   pack=state.spec.prompt.pack, features=state.features))
        if found is None:
            return _fail(state, f"no row with key {key!r}", 404)
        return _json(state, found)

    async def api_review(request: web.Request) -> web.Response:
        if not state.index.ready:
            return _fail(state, "the page's index is still being built; try again in a moment", 409)
        try:
            n = min(MAX_SAMPLE, max(1, int(request.query.get("n") or 50)))
            seed = int(request.query.get("seed") or 0)
        except ValueError:
            return _fail(state, "n and seed must be whole numbers")
        fields = list(state.spec.output.fields)
        field = request.query.get("field") or fields[0]
        stratify = request.query.get("stratify", field)
        if field not in fields or (stratify and stratify not in fields):
            return _fail(state, f"no output field {field!r} / {stratify!r}")
        plan = state.plan()
        key = (plan, n, seed, stratify)

        def work() -> dict[str, Any]:
            if key not in state.samples:
                col = f"f{fields.index(stratify)}" if stratify else None
                state.samples[key] = quality.review_sample(state.index_reader(), plan, n, seed=seed, stratify=col)
            keys = state.samples[key]
            labels = quality.labels_of(state.ledger(), keys) if state.features["labels"] else {}
            return {"keys": keys, "field": field, "stratify": stratify, "seed": seed, "n": n,
                    "labelled": [k for k in keys if field in labels.get(k, {})]}

        return _json(state, await state.run(work))

    async def api_eval(request: web.Request) -> web.Response:
        if not state.features["labels"]:
            return _json(state, {"labels": 0, "fields": {}, "why": meta(state)["labels"]["why"]})
        return _json(state, await state.run(lambda: quality.evaluate(state.ledger(), state.plan(),
                                                                     state.spec.output.fields)))

    async def _body(request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise web.HTTPBadRequest(text="the body must be JSON") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="the body must be a JSON object")
        return body

    async def api_label(request: web.Request) -> web.Response:
        body = await _body(request)
        if not state.features["labels"]:
            return _fail(state, meta(state)["labels"]["why"], 409)
        key, field = body.get("key"), body.get("field")
        if not isinstance(key, str) or field not in state.spec.output.fields or "value" not in body:
            return _fail(state, "a label needs key, field (an output field) and value")
        exists = await state.run(lambda: state.ledger().execute("SELECT 1 FROM rows WHERE key = ?", (key,)).fetchone())
        if exists is None:
            return _fail(state, f"no row with key {key!r}", 404)
        await state.run(quality.write_label, state.ledger_path, key, field, body["value"])
        return _json(state, {"ok": True, "key": key, "field": field, "value": body["value"]})

    async def api_stop(request: web.Request) -> web.Response:
        await _body(request)
        try:
            return _json(state, {"ok": True, "message": actions.stop_run(state.ledger_path)})
        except actions.ActionRefused as exc:
            return _fail(state, str(exc), 409)

    def _requeue_chunks(params: Any):
        """The rows a re-queue moves (the filter's rows that are done, failed or fallback), in chunks of keys."""
        types = {n: f.type for n, f in state.spec.output.fields.items()}
        q = RowQuery(status="failed") if params.get("what") == "failed" else RowQuery.from_params(
            params, state.columns, types)
        indexed = state.index.ready and not state.index.behind
        db = state.index_reader() if indexed else state.ledger()
        return iter_keys(db, state.columns, state.plan(), q, indexed=indexed, statuses=actions.REQUEUABLE)

    async def api_requeue_preview(request: web.Request) -> web.Response:
        try:
            rows = await state.run(lambda: sum(len(c) for c in _requeue_chunks(request.query)))
        except ValueError as exc:
            return _fail(state, str(exc))
        return _json(state, {"rows": rows, "text": (
            f"{rows:,} rows (done, failed or fallback) go back to pending: the next `llmap run` sends them again "
            "(a run going now takes those still ahead of it). Their answers so far stay in each row's detail. "
            "Failed rows are retried by every run anyway. With the response cache on, an unchanged request gets "
            "its cached answer back: change the prompt or the model, or turn the cache off, for a new one.")})

    async def api_requeue(request: web.Request) -> web.Response:
        body = await _body(request)
        params = {str(k): str(v) for k, v in body.items()}

        def work() -> int:
            return sum(actions.requeue(state.ledger_path, chunk) for chunk in _requeue_chunks(params))

        try:
            moved = await state.run(work)
        except ValueError as exc:
            return _fail(state, str(exc))
        state.index.rewind(5.0)
        return _json(state, {"ok": True, "rows": moved,
                             "message": f"{moved:,} rows are pending again; the next `llmap run` sends them"})

    async def api_rollback(request: web.Request) -> web.Response:
        body = await _body(request)
        try:
            run_id = int(body.get("run"))
        except (TypeError, ValueError):
            return _fail(state, "roll back needs {run: RUN_ID}")
        if not state.features["rollback"]:
            return _fail(state, meta(state)["rollback"]["why"], 409)
        try:
            message = await state.run(actions.rollback, state.ledger_path, run_id, lambda: export_job(state.spec))
        except actions.ActionRefused as exc:
            return _fail(state, str(exc), 409)
        state.index.rewind(5.0)
        return _json(state, {"ok": True, "message": message})

    app.router.add_get(f"{base}", index_page)
    app.router.add_get(f"{base}/", index_page)
    app.router.add_get(f"{base}/static/{{name}}", static)
    app.router.add_get(f"{base}/api/meta", api_meta)
    app.router.add_get(f"{base}/api/summary", api_summary)
    app.router.add_get(f"{base}/api/events", api_events)
    app.router.add_get(f"{base}/api/rows", api_rows)
    app.router.add_get(f"{base}/api/row", api_row)
    app.router.add_get(f"{base}/api/review", api_review)
    app.router.add_get(f"{base}/api/eval", api_eval)
    app.router.add_get(f"{base}/api/requeue", api_requeue_preview)
    app.router.add_post(f"{base}/api/label", api_label)
    app.router.add_post(f"{base}/api/stop", api_stop)
    app.router.add_post(f"{base}/api/requeue", api_requeue)
    app.router.add_post(f"{base}/api/rollback", api_rollback)
