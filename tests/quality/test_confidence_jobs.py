"""``_confidence`` through whole runs: asked for only when wanted, kept by the cache, null with a reason where
the server gives none (a refusal remembered like a dialect, Anthropic), and the report and HTML sections."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
from typer.testing import CliRunner

from _support import ScriptedProvider, chat_requests, people, with_providers, write_csv
from llmap import Job
from llmap.cli import app
from llmap.sim import Simulator

runner = CliRunner()


def _job(tmp_path: Path, model: str, *, confidence: str = "", name: str = "job", n: int = 10,
         cache: bool = True) -> Path:
    write_csv(tmp_path / "people.csv", people(n))
    job = tmp_path / f"{name}.toml"
    job.write_text(f'''
[input]
path = "people.csv"
key = "id"
[prompt]
user = "Name: {{{{ name }}}}"
[output]
path = "out/{name}.parquet"
{confidence}
[output.fields]
kind = {{ type = "string", enum = ["a", "b", "c"] }}
score = {{ type = "number" }}
{model}
[cache]
enabled = {str(cache).lower()}
''', encoding="utf-8")
    return job


def _openai(url: str) -> str:
    return f'[model]\nprovider = "openai"\nname = "sim"\nbase_url = "{url}"\n'


def _confidences(res) -> dict[str, float | None]:
    return {r["id"]: r["_confidence"] for r in pq.read_table(res.output_path).to_pylist()}


def test_logprobs_are_asked_only_when_the_confidence_covers_a_field(tmp_path, monkeypatch):
    seen = []
    for setting in ('confidence = "auto"', "confidence = false", 'confidence = ["score"]'):
        provider = ScriptedProvider("openai:sim", lambda n, req: '{"kind": "a", "score": 0.5}')
        with_providers(monkeypatch, [provider])
        job = _job(tmp_path, _openai("http://127.0.0.1:9/v1"), confidence=setting, n=2, cache=False)
        Job.from_toml(job).run(fresh=True)
        seen.append({r.logprobs for r in provider.requests})
    assert seen == [{True}, {False}, {True}]


def test_the_cache_keeps_each_answers_confidence(tmp_path, sim):
    first = Job.from_toml(_job(tmp_path, _openai(sim.base_url), name="one")).run()
    sent = chat_requests(sim)
    second = Job.from_toml(_job(tmp_path, _openai(sim.base_url), name="two")).run()
    assert chat_requests(sim) == sent  # every answer from the cache
    assert _confidences(second) == _confidences(first) and all(0 < c < 1 for c in _confidences(first).values())


def test_a_server_that_refuses_logprobs_is_remembered_and_report_says_why(tmp_path):
    with Simulator(refuse_logprobs=True) as sim:
        first = Job.from_toml(_job(tmp_path, _openai(sim.base_url), name="one", cache=False)).run()
        assert first.counts["done"] == 10 and chat_requests(sim) == 11  # one refused request, then none
        second = Job.from_toml(_job(tmp_path, _openai(sim.base_url), name="two", cache=False)).run()
        assert second.counts["done"] == 10 and chat_requests(sim) == 21  # remembered: no refusal at all
    assert set(_confidences(first).values()) == {None}
    out = runner.invoke(app, ["report", str(tmp_path / "one.toml")])
    assert out.exit_code == 0, out.output
    assert ("_confidence: openai:sim: 0 of 10 done rows; none for the others: the server refused the logprobs"
            in out.stdout)


def test_anthropic_answers_have_no_confidence_and_report_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    with Simulator() as sim:
        url = sim.base_url.removesuffix("/v1")
        res = Job.from_toml(_job(tmp_path, f'[model]\nprovider = "anthropic"\nname = "claude-haiku-4-5"\n'
                                           f'base_url = "{url}"\n')).run()
    assert res.counts["done"] == 10 and set(_confidences(res).values()) == {None}
    out = runner.invoke(app, ["report", str(tmp_path / "job.toml")])
    assert "Anthropic's Messages API returns no token log-probabilities" in out.stdout


def test_report_and_html_show_the_evaluation_when_there_are_labels(tmp_path, sim):
    job = _job(tmp_path, _openai(sim.base_url), n=30)
    res = Job.from_toml(job).run()
    rows = pq.read_table(res.output_path).to_pylist()
    truth = [{"id": r["id"], "kind": r["kind"] if i % 3 else "c"} for i, r in enumerate(rows)]
    write_csv(tmp_path / "labels.csv", truth)
    assert runner.invoke(app, ["label", str(job), str(tmp_path / "labels.csv")]).exit_code == 0
    out = runner.invoke(app, ["report", str(job), "--html", str(tmp_path / "r.html")])
    assert out.exit_code == 0, out.output
    assert "kind (string, enum): accuracy" in out.stdout and "confusion matrix" in out.stdout
    page = (tmp_path / "r.html").read_text()
    assert 'id="eval"' in page and "Confusion matrix" in page and "ECE" in page and "<script" not in page
    rep = json.loads(runner.invoke(app, ["eval", str(job), "--json"]).stdout)
    assert rep["fields"]["kind"]["accuracy_n"] == 30


def test_batch_answers_carry_their_confidence(tmp_path):
    with Simulator(batch_time=0.2) as sim:
        job = _job(tmp_path, _openai(sim.base_url) + "batch = true\nprice_in = 1.0\nprice_out = 2.0\n")
        job.write_text(job.read_text() + "[batch]\npoll_s = 0.05\n")
        res = Job.from_toml(job).run()
        assert res.counts["done"] == 10 and sim.stats()["requests"] == 0  # every row by the batch
    assert all(c is not None and 0 < c < 1 for c in _confidences(res).values())
