"""Structured output on every OpenAI-compatible server, reasoning-model parameters, and
configuration errors that stop a run instead of storming (against the simulator)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from aiohttp import web
from typer.testing import CliRunner

from _support import NO_BACKOFF, ScriptedProvider, chat_requests, with_providers
from llmap import Job
from llmap.cli import app
from llmap.errors import Overloaded
from llmap.observe.progress import CountingProgress
from llmap.observe.report import model_report
from llmap.observe.status import job_status
from llmap.sim import Simulator
from llmap.store.dialects import DialectMemory

runner = CliRunner()


def _memory() -> dict:
    path = Path(os.environ["LLMAP_CACHE_DIR"]) / "dialects.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _set(job: Path, old: str, new: str) -> None:
    job.write_text(job.read_text().replace(old, new))


@pytest.fixture
def llama_like():
    """A server that takes response_format json_object (with a schema) and refuses json_schema with a
    500 whose body is pydantic's validation error, as python -m llama_cpp.server 0.3.36 does."""
    with Simulator(response_formats="json_object", format_error="llama-cpp-python") as s:
        yield s


# -- structured = "auto" ---------------------------------------------------------------------------

def test_auto_steps_to_json_object_at_once_and_remembers_it(make_job, llama_like):
    job = make_job(20, base_url=llama_like.base_url, concurrency=8)
    progress = CountingProgress()
    res = Job.from_toml(job).run(progress=progress)
    assert res.counts["done"] == 20 and res.exit_code == 0
    # one refused request: the first probes alone, the rows in flight behind it wait for its verdict
    assert chat_requests(llama_like) == 21 and res.requests == 21 and res.retries == 0
    assert llama_like.stats()["by_status"] == {"200": 20, "500": 1}
    assert any("refused structured output json_schema; using json_object (HTTP 500)" in m for m in progress.messages)
    assert job_status(Job.from_toml(job).spec).structured == {"openai:sim": "json_object (auto, refused json_schema)"}
    lines, _ = model_report(Job.from_toml(job).spec)
    assert [ln.structured for ln in lines] == ["json_object (auto, refused json_schema)"]
    assert _memory()[f"{llama_like.base_url} sim"]["structured"] == "json_object"
    # the next run starts right: no refused request
    _set(job, "You sort people.", "You sort people into groups.")
    llama_like.reset_stats()
    res2 = Job.from_toml(job).run()
    assert res2.counts["done"] == 20 and chat_requests(llama_like) == 20
    assert job_status(Job.from_toml(job).spec).structured == {"openai:sim": "json_object (remembered)"}


def test_status_and_report_commands_say_the_dialect(make_job, llama_like):
    job = make_job(3, base_url=llama_like.base_url)
    assert runner.invoke(app, ["run", str(job)]).exit_code == 0
    st = runner.invoke(app, ["status", str(job)])
    assert "structured output: openai:sim: json_object (auto, refused json_schema)" in st.stdout
    assert json.loads(runner.invoke(app, ["status", str(job), "--json"]).stdout)["structured"] == {
        "openai:sim": "json_object (auto, refused json_schema)"}
    rep = runner.invoke(app, ["report", str(job)])
    assert rep.exit_code == 0
    assert "structured output: openai:sim: json_object (auto, refused json_schema)" in rep.stdout


def test_a_remembered_dialect_that_is_refused_later_falls_forward(make_job, sim):
    DialectMemory().put(sim.base_url, "sim", {"structured": "json_object"})
    sim.reconfigure(response_formats="")  # the server now takes no response_format at all
    job = make_job(10, concurrency=4)
    res = Job.from_toml(job).run()
    assert res.counts["done"] == 10
    assert chat_requests(sim) <= 10 + 4  # the rows in flight when the first refusal came switch too
    assert _memory()[f"{sim.base_url} sim"]["structured"] == "prompt"
    assert job_status(Job.from_toml(job).spec).structured["openai:sim"] == "prompt (auto, refused json_object)"


def test_prompt_dialect_carries_the_schema_in_the_system_prompt(make_job):
    with Simulator(response_formats="") as s:
        job = make_job(6, base_url=s.base_url, model_extra='structured = "prompt"')
        res = Job.from_toml(job).run()
        assert res.counts["done"] == 6 and chat_requests(s) == 6  # validated answers, no refusal


def test_the_dialect_does_not_change_the_cache_key(make_job, sim):
    job = make_job(5, model_extra='structured = "json_object"')
    assert Job.from_toml(job).run().counts["done"] == 5 and chat_requests(sim) == 5
    _set(job, 'structured = "json_object"', 'structured = "json_schema"')
    res = Job.from_toml(job).run(fresh=True)
    assert res.counts["done"] == 5 and chat_requests(sim) == 5  # all 5 answered from the response cache


def test_params_that_change_answers_are_in_the_cache_key(make_job, sim):
    job = make_job(4, model_extra="params = { seed = 1 }")
    Job.from_toml(job).run()
    _set(job, "params = { seed = 1 }", "params = { seed = 2 }")
    Job.from_toml(job).run()
    assert chat_requests(sim) == 8  # another seed: asked again (and the rows were pending again)
    _set(job, "params = { seed = 2 }", 'params = { seed = 2, user = "etl-nightly" }')
    res = Job.from_toml(job).run(fresh=True)
    assert res.counts["done"] == 4 and chat_requests(sim) == 8  # `user` changes no answer: cache hits


# -- forced dialects and configuration errors -----------------------------------------------------

def test_forced_json_schema_stops_within_a_few_requests_with_one_line(make_job, llama_like):
    job = make_job(40, base_url=llama_like.base_url, concurrency=8, model_extra='structured = "json_schema"')
    out = runner.invoke(app, ["run", str(job), "--quiet"])
    assert out.exit_code == 1
    # no retry storm, no breaker dance: one probe at a time, three identical refusals, then stop
    assert chat_requests(llama_like) == 3 and " 3 requests (0 retries" in out.stderr
    words = "Input should be 'text' or 'json_object' (got 'json_schema')"
    assert out.stderr.count(words) == 1, out.stderr  # one message, not one per row or retry
    stopped = next(ln for ln in out.stderr.splitlines() if words in ln)
    assert "run stopped:" in stopped and 'set [model] structured = "auto"' in stopped
    rows = pq.read_table(job.parent / "out" / "result.parquet").to_pylist()
    assert sum(r["_status"] == "pending" for r in rows) >= 37  # nothing lost: the rerun asks them
    _set(job, 'structured = "json_schema"', 'structured = "auto"')
    assert runner.invoke(app, ["run", str(job), "--quiet"]).exit_code == 0


def test_wrong_model_name_stops_the_run_naming_the_fix(make_job, sim):
    job = make_job(30, model_extra="", concurrency=4)
    _set(job, 'name = "sim"', 'name = "missing-model-x"')
    res = Job.from_toml(job).run()
    assert res.exit_code == 1 and chat_requests(sim) == 3
    assert "does not exist" in res.stop_reason and "check [model] name" in res.stop_reason
    assert res.counts["done"] == 0 and res.counts["pending"] >= 27 and res.retries == 0


def test_a_misconfigured_model_is_left_out_and_the_next_one_serves(make_job, sim, tmp_path):
    with Simulator() as backup:
        job = make_job(20, concurrency=4)
        text = job.read_text()
        model = text[text.index("[model]"):text.index("[limits]")]
        job.write_text(text.replace(model, model.replace("[model]", "[[model]]").replace(
            'name = "sim"', 'name = "missing-model-x"') + model.replace("[model]", "[[model]]").replace(
            sim.base_url, backup.base_url)))
        progress = CountingProgress()
        res = Job.from_toml(job).run(progress=progress)
        assert res.exit_code == 0 and res.counts["done"] == 20
        assert chat_requests(sim) == 3 and chat_requests(backup) == 20
        assert any("leaving openai:missing-model-x out for the rest of the run" in m for m in progress.messages)
        assert {r["_model"] for r in pq.read_table(res.output_path).to_pylist()} == {"openai:sim"}


def test_transient_errors_never_look_like_a_configuration_error(make_job, monkeypatch):
    p = ScriptedProvider("openai:sim", lambda n, r: Overloaded("HTTP 503: overloaded", status=503) if n <= 6
                         else '{"kind": "a", "score": 0.5}')
    with_providers(monkeypatch, [p])
    res = Job.from_toml(make_job(10, concurrency=1, limits_extra=NO_BACKOFF)).run()
    assert res.exit_code == 0 and res.counts["done"] == 10 and res.stop_reason is None


# -- OpenAI reasoning models: max_completion_tokens, no temperature ------------------------------

@pytest.mark.parametrize("model", ["o3-mini", "gpt-5-nano"])
def test_reasoning_models_get_max_completion_tokens_and_no_temperature(make_job, sim, model):
    job = make_job(12, concurrency=4)
    _set(job, 'name = "sim"', f'name = "{model}"')
    progress = CountingProgress()
    res = Job.from_toml(job).run(progress=progress)
    assert res.counts["done"] == 12 and res.exit_code == 0
    assert chat_requests(sim) == 12 + 2  # the first row: max_tokens refused, then temperature refused
    assert any("sending max_completion_tokens (HTTP 400)" in m for m in progress.messages)
    assert job_status(Job.from_toml(job).spec).structured[f"openai:{model}"].endswith(
        "; max_completion_tokens, no temperature")
    sim.reset_stats()
    Job.from_toml(job).run(fresh=True, progress=CountingProgress())
    assert chat_requests(sim) == 0  # cache hits: the parameter spelling is not part of the key
    _set(job, "You sort people.", "You sort people, carefully.")
    Job.from_toml(job).run()
    assert chat_requests(sim) == 12  # remembered: no refused request


def test_a_parameter_the_user_set_is_not_adapted_away(make_job, sim):
    job = make_job(10, concurrency=2, model_extra="params = { temperature = 0.5 }")
    _set(job, 'name = "sim"', 'name = "o1-mini"')
    res = Job.from_toml(job).run()
    assert res.exit_code == 1 and "check [model] params" in res.stop_reason and "temperature" in res.stop_reason


# -- params, headers, query -----------------------------------------------------------------------

class _Recorder:
    """An OpenAI-compatible server that records each request's body, headers and query."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict, dict, dict]] = []

    def __enter__(self) -> _Recorder:
        ready = threading.Event()

        async def chat(request: web.Request) -> web.Response:
            body = await request.json()
            self.seen.append(("chat", body, dict(request.headers), dict(request.query)))
            content = json.dumps({"kind": "a", "score": 0.5})
            return web.json_response({"choices": [{"message": {"role": "assistant", "content": content}}],
                                      "usage": {"prompt_tokens": 5, "completion_tokens": 5}})

        async def models(request: web.Request) -> web.Response:
            self.seen.append(("models", {}, dict(request.headers), dict(request.query)))
            return web.json_response({"data": []})

        def serve() -> None:
            self.loop = asyncio.new_event_loop()
            app_ = web.Application()
            app_.add_routes([web.post("/v1/chat/completions", chat), web.get("/v1/models", models)])
            self.runner = web.AppRunner(app_)
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()

        threading.Thread(target=serve, daemon=True).start()
        ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)


def test_params_headers_and_query_reach_the_server(make_job, monkeypatch):
    monkeypatch.setenv("LLMAP_TEST_GATEWAY_KEY", "gw-secret-123")
    with _Recorder() as rec:
        job = make_job(2, base_url=f"http://127.0.0.1:{rec.port}/v1", model_extra=(
            'params = { reasoning_effort = "low", temperature = 0.7, max_completion_tokens = 99 }\n'
            'headers = { "api-key" = "${LLMAP_TEST_GATEWAY_KEY}", "X-Team" = "data" }\n'
            'query = { "api-version" = "2024-10-21" }'))
        res = Job.from_toml(job).run()
    assert res.counts["done"] == 2
    kinds = [k for k, *_ in rec.seen]
    assert kinds[0] == "models" and kinds.count("chat") == 2
    for kind, body, headers, query in rec.seen:
        assert query == {"api-version": "2024-10-21"}
        assert headers["api-key"] == "gw-secret-123" and headers["X-Team"] == "data"
        if kind == "chat":
            assert body["reasoning_effort"] == "low" and body["temperature"] == 0.7
            assert body["max_completion_tokens"] == 99 and "max_tokens" not in body
            assert body["response_format"]["type"] == "json_schema"


def test_bad_params_and_settings_are_spec_errors(make_job, monkeypatch):
    from llmap.errors import SpecError

    job = make_job(1, model_extra='params = { response_format = "x" }')
    with pytest.raises(SpecError, match="params.response_format is set by llmap .use \\[model\\] structured"):
        Job.from_toml(job)
    job = make_job(1, model_extra='structured = "xml"')
    with pytest.raises(SpecError, match="structured"):
        Job.from_toml(job)
    job = make_job(1, model_extra='headers = { "api-key" = "${LLMAP_TEST_UNSET_VAR}" }')
    monkeypatch.delenv("LLMAP_TEST_UNSET_VAR", raising=False)
    out = runner.invoke(app, ["run", str(job)])
    assert out.exit_code == 2 and "reads ${LLMAP_TEST_UNSET_VAR}, which is not set" in out.stderr


def test_dialect_memory_survives_a_bad_file_and_stays_small(tmp_path, monkeypatch):
    monkeypatch.setattr("llmap.store.dialects.MAX_ENTRIES", 3)
    mem = DialectMemory(tmp_path / "d.json")
    (tmp_path / "d.json").write_text("{not json")
    assert mem.get("http://x/v1", "m") is None  # unreadable: learn again
    for i in range(5):
        mem.put(f"http://127.0.0.1:{8000 + i}/v1", "sim", {"structured": "json_object"})
    mem.put("http://127.0.0.1:8002/v1/", "sim", {"structured": "prompt"})  # learned again: now the newest
    kept = json.loads((tmp_path / "d.json").read_text())
    assert list(kept) == ["http://127.0.0.1:8003/v1 sim", "http://127.0.0.1:8004/v1 sim",
                          "http://127.0.0.1:8002/v1 sim"]
    assert mem.get("http://127.0.0.1:8002/v1", "sim")["structured"] == "prompt"


def test_a_raw_newline_inside_an_answer_string_is_taken_as_it_is():
    # llama-cpp-python 0.3.36's grammar lets the embedded model write one ('char ::= [^"\\]'); it failed the row
    from llmap.errors import AnswerInvalid
    from llmap.prompt.schema import OutputSchema
    from llmap.spec import FieldSpec

    schema = OutputSchema({"summary": FieldSpec(type="string", max_length=80), "n": FieldSpec(type="integer")})
    assert schema.validate('{"summary": "two\nlines", "n": 1}') == {"summary": "two\nlines", "n": 1}
    with pytest.raises(AnswerInvalid, match="n: Input should be a valid integer"):
        schema.validate('{"summary": "two\nlines", "n": "x"}')
    with pytest.raises(AnswerInvalid, match="not valid JSON"):
        schema.validate('{"summary": "cut\noff"')
