"""Alerts, structured logs, and API keys that never leak."""

from __future__ import annotations

import asyncio
import json
import threading

import pyarrow.parquet as pq
from aiohttp import web
from typer.testing import CliRunner

from _support import FAST_BACKOFF, ScriptedProvider, chat_requests, with_providers
from llmap import Job
from llmap.cli import app
from llmap.errors import BadRequest
from llmap.sim import Simulator

runner = CliRunner()
SECRET = "sk-test-Zq81-very-secret-key"


def test_failure_rate_alert_stops_a_broken_run_early(make_job, monkeypatch):
    # Rows that fail in varied ways (an identical refusal on every request is a configuration
    # error, stopped sooner by the misconfiguration check: see tests/test_structured.py).
    words = ["alpha", "beta", "gamma"]
    p = ScriptedProvider("openai:sim", lambda n, r: BadRequest(f"HTTP 400: refused, {words[n % 3]}"))
    with_providers(monkeypatch, [p])
    job = make_job(200, concurrency=2)
    job.write_text(job.read_text() + "\n[alerts]\nmax_failure_rate = 0.2\nwindow = 10\n")
    res = Job.from_toml(job).run()
    assert res.exit_code == 1 and "max_failure_rate = 0.2" in res.stop_reason
    assert res.counts["failed"] >= 10 and res.counts["pending"] > 150
    assert len(p.requests) < 40  # stopped after about one window, not 200 rows


def test_log_json_events_and_prompts_only_on_request(make_job, sim, tmp_path):
    job = make_job(5)
    log = tmp_path / "events.jsonl"
    out = runner.invoke(app, ["run", str(job), "--log-json", str(log)])
    assert out.exit_code == 0, out.stderr
    events = [json.loads(x) for x in log.read_text().splitlines()]
    requests = [e for e in events if e["event"] == "request"]
    rows = [e for e in events if e["event"] == "row"]
    assert len(requests) == 5 and {e["outcome"] for e in requests} == {"200"}
    assert all(e["model"] == "openai:sim" and e["latency_s"] >= 0 for e in requests)
    assert sorted(e["key"] for e in rows) == [f"p{i:04d}" for i in range(5)]
    assert all("messages" not in e and "output" not in e for e in rows)
    job.write_text(job.read_text().replace("You sort people.", "You sort people!"))
    out = runner.invoke(app, ["run", str(job), "--log-json", str(log), "--log-prompts"])
    rows = [json.loads(x) for x in log.read_text().splitlines() if '"event": "row"' in x][5:]
    assert rows and all(e["messages"][0]["content"] == "You sort people!" and e["output"] for e in rows)


def test_log_prompts_needs_log_json(make_job):
    out = runner.invoke(app, ["run", str(make_job(1)), "--log-prompts"])
    assert out.exit_code == 2 and "--log-prompts needs --log-json" in out.stderr


class _EchoServer:
    """An OpenAI-like server that answers 400 with the request's Authorization header in the body."""

    def __enter__(self):
        ready = threading.Event()

        async def echo(request):
            return web.json_response({"error": {"message": f"bad request from {request.headers['Authorization']}"}},
                                     status=400)

        async def models(request):
            return web.json_response({"data": []})

        def serve():
            self.loop = asyncio.new_event_loop()
            app_ = web.Application()
            app_.add_routes([web.post("/v1/chat/completions", echo), web.get("/v1/models", models)])
            self.runner = web.AppRunner(app_)
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        ready.wait(5)
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _leaks(paths) -> list[str]:
    found = []
    for p in paths:
        if p.is_file() and SECRET.encode() in p.read_bytes():
            found.append(str(p))
    return found


def test_api_key_never_in_logs_ledger_cache_output_or_errors(make_job, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMAP_TEST_SECRET_KEY", SECRET)
    with Simulator(require_key=SECRET, fail_rate=0.2, malformed_rate=0.1, seed=3) as sim:
        job = make_job(20, base_url=sim.base_url, model_extra='api_key_env = "LLMAP_TEST_SECRET_KEY"',
                       limits_extra=FAST_BACKOFF)
        out = runner.invoke(app, ["run", str(job), "--log-json", str(tmp_path / "log.jsonl"), "--log-prompts"])
        assert out.exit_code == 0, out.stderr
        assert SECRET not in out.stderr + out.stdout
    with _EchoServer() as echo:  # a server that repeats the key back in its error body
        job.write_text(job.read_text().replace(sim.base_url, f"http://127.0.0.1:{echo.port}/v1"))
        out = runner.invoke(app, ["run", str(job), "--log-json", str(tmp_path / "log.jsonl"), "--fresh"])
        assert out.exit_code == 1
        # every request refused the same way: the run stops with one message quoting the server
        assert "refused every request the same way" in out.stderr and "bad request from Bearer ***" in out.stderr
        errors = [r["_error"] for r in pq.read_table(tmp_path / "out" / "result.parquet").to_pylist() if r["_error"]]
        assert errors and all("bad request from Bearer ***" in e for e in errors)
    files = list(tmp_path.rglob("*"))
    assert any(f.name.endswith(".sqlite") for f in files)  # the ledger and the cache were written
    assert _leaks(files) == []


def test_metrics_port_is_served_during_the_run(make_job):
    out = runner.invoke(app, ["run", str(make_job(5)), "--metrics-port", "0"])
    assert out.exit_code == 0, out.stderr
    assert "metrics on http://127.0.0.1:" in out.stderr


def test_estimate_and_report_html_commands(make_job, sim, tmp_path):
    job = make_job(6)
    est = runner.invoke(app, ["estimate", str(job)])
    assert est.exit_code == 0 and "rows to request" in est.stdout and chat_requests(sim) == 0
    assert runner.invoke(app, ["run", str(job)]).exit_code == 0
    html = tmp_path / "report.html"
    rep = runner.invoke(app, ["report", str(job), "--html", str(html), "--by", "city"])
    assert rep.exit_code == 0, rep.stderr
    text = html.read_text()
    assert text.count('class="plot"') == 5 and "http" not in text.split("<body", 1)[1]
    bad = runner.invoke(app, ["report", str(job), "--run", "9"])
    assert bad.exit_code == 2 and "run 9 not found" in bad.stderr
