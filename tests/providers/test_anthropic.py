"""provider = "anthropic" end to end against the simulator's Messages API: structured output, re-asks,
cuts and refusals, limits, 529s, the spend-limit stop, packing, prompt caching and its price, failover
and cascade across providers, and the preflight (missing key, wrong key, unknown model)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import llmap
from _support import people, write_csv
from llmap import Job
from llmap.cli import app
from llmap.observe.metrics import RunMetrics
from llmap.observe.progress import CountingProgress
from llmap.observe.report import build_run_summary, model_report
from llmap.pricing import cost_usd
from llmap.sim import Simulator

runner = CliRunner()
KEY = "sk-ant-test-key"
SYSTEM = "You sort people into groups. " + "Read each record carefully and answer with care. " * 120  # ~1,500 tokens
FIELDS = '''kind = { type = "string", enum = ["a", "b", "c"] }
score = { type = "number", minimum = 0, maximum = 1 }
'''


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)


@pytest.fixture
def claude():
    with Simulator(require_key=KEY) as s:
        yield s


def model_table(url: str, name: str = "claude-haiku-4-5", extra: str = "", table: str = "[model]") -> str:
    return (f'{table}\nprovider = "anthropic"\nname = "{name}"\nbase_url = "{url}"\n'
            f"price_in = 1.0\nprice_out = 5.0\n{extra}\n")


def write_job(tmp_path: Path, models: str, *, n: int = 12, fields: str = FIELDS, limits: str = "concurrency = 4",
              system: str = SYSTEM, prompt_extra: str = "", rows: list[dict] | None = None) -> Path:
    write_csv(tmp_path / "people.csv", rows or people(n))
    job = tmp_path / "job.toml"
    job.write_text(
        f'[input]\npath = "people.csv"\nkey = "id"\n'
        f'[prompt]\nsystem = "{system}"\nuser = "Name: {{{{ name }}}}; city: {{{{ city }}}}."\n{prompt_extra}\n'
        f'[output]\npath = "out/result.parquet"\nkeep = ["name"]\n[output.fields]\n{fields}\n'
        f"{models}\n[limits]\n{limits}\n", encoding="utf-8")
    return job


def ledger(tmp_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(tmp_path / ".llmap" / "job.ledger.sqlite")


def rows_of(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


# -- structured output ----------------------------------------------------------------------------

@pytest.mark.parametrize("structured", ["tool", "json_schema"])
def test_structured_output_tool_and_json_schema(tmp_path, claude, structured):
    job = write_job(tmp_path, model_table(claude.url, extra=f'structured = "{structured}"'))
    res = Job.from_toml(job).run()
    assert res.exit_code == 0 and res.counts["done"] == 12 and res.requests == 12
    assert claude.stats()["by_status"] == {"200": 12}
    out = rows_of(res.output_path)
    assert all(r["kind"] in ("a", "b", "c") and 0 <= r["score"] <= 1 and r["_model"] == "anthropic:claude-haiku-4-5"
               for r in out)
    st = runner.invoke(app, ["status", str(job)])
    assert f"structured output: anthropic:claude-haiku-4-5: {structured}" in st.stdout


def test_bounds_left_out_of_output_config_are_enforced_by_re_asks(tmp_path, claude):
    """structured outputs refuse minimum/maximum, so llmap leaves them out and re-asks what breaks them."""
    fields = 'n = { type = "integer", minimum = 50 }\n'
    job = write_job(tmp_path, model_table(claude.url, extra='structured = "json_schema"'), n=12, fields=fields)
    res = Job.from_toml(job).run()
    with ledger(tmp_path) as db:
        failed = db.execute("SELECT attempts, error FROM rows WHERE status = 'failed'").fetchall()
        invalid = db.execute("SELECT count(*) FROM attempts WHERE outcome = 'invalid'").fetchone()[0]
    done = [r for r in rows_of(res.output_path) if r["_status"] == "done"]
    assert done and failed and len(done) + len(failed) == 12
    assert all(r["n"] >= 50 for r in done)  # llmap's validation held the bound the schema could not carry
    assert all(a == 3 and "after 2 re-asks" in e for a, e in failed) and invalid == 3 * len(failed)
    # with a forced tool the bounds are in the schema the model follows: no re-ask (the rows done before
    # come from the response cache: the dialect is not part of its key)
    job = write_job(tmp_path, model_table(claude.url), n=12, fields=fields)
    res = Job.from_toml(job).run()
    assert res.counts["done"] == 12 and res.requests == len(failed) and res.retries == 0


def test_answers_cut_at_max_tokens_stop_the_run_saying_raise_max_tokens(tmp_path, claude):
    job = write_job(tmp_path, model_table(claude.url, extra="max_tokens = 3"))
    res = Job.from_toml(job).run()
    assert res.exit_code == 1 and res.counts["done"] == 0
    assert "raise [model] max_tokens" in res.stop_reason
    # the first row alone and its re-ask, then the next rows in flight (concurrency 4): not a storm
    assert claude.stats()["requests"] <= 2 + 4


def test_a_refusal_fails_its_row_and_says_so(tmp_path, claude):
    rows = people(6)
    rows[2]["name"] = "Someone [sim:refuse]"
    job = write_job(tmp_path, model_table(claude.url), rows=rows)
    res = Job.from_toml(job).run()
    assert res.counts == {"pending": 0, "done": 5, "failed": 1, "skipped": 0, "fallback": 0}
    failed = [r for r in rows_of(res.output_path) if r["_status"] == "failed"]
    assert failed[0]["id"] == "p0002" and "declined to answer (stop_reason refusal)" in failed[0]["_error"]


# -- limits and errors ----------------------------------------------------------------------------

def test_429s_with_retry_after_pause_and_every_row_is_done(tmp_path):
    with Simulator(require_key=KEY, limit_rate=0.3, seed=3) as sim:
        job = write_job(tmp_path, model_table(sim.url), n=10, system="You sort people.")
        res = Job.from_toml(job).run()
        stats = sim.stats()
    assert res.counts["done"] == 10 and res.exit_code == 0
    assert stats["by_status"]["429"] == res.rate_limited > 0 and res.retries >= res.rate_limited
    assert res.elapsed_s >= 1.0  # each 429 said retry-after: 1, and the model paused for it


def test_headers_are_learned_with_separate_input_and_output_buckets(tmp_path):
    lanes = []
    with Simulator(require_key=KEY, rpm=600, itpm=50_000, otpm=8_000) as sim:
        job = write_job(tmp_path, model_table(sim.url), n=10, limits="", system="You sort people.")  # none told
        res = Job.from_toml(job).run(on_start=lambda stats, tally, ls: lanes.extend(ls))
    rate = lanes[0].limiter.rate
    assert res.counts["done"] == 10 and res.rate_limited == 0
    assert (rate.requests.capacity, rate.input_tokens.capacity, rate.output_tokens.capacity) == (600, 50_000, 8_000)
    assert rate.tokens is None  # Anthropic's combined tokens-* header is not a budget to pace by


def test_itpm_and_otpm_in_limits_and_per_model(tmp_path, claude):
    lanes = []
    job = write_job(tmp_path, model_table(claude.url, extra="otpm = 9000"), n=2, limits="itpm = 40000\notpm = 20000",
                    system="You sort people.")
    Job.from_toml(job).run(on_start=lambda stats, tally, ls: lanes.extend(ls))
    rate = lanes[0].limiter.rate
    assert rate.input_tokens.capacity == 40_000 and rate.output_tokens.capacity == 9_000


def test_529s_open_the_breaker_without_cutting_concurrency_and_rows_fail_over_to_openai(tmp_path):
    lanes, progress = [], CountingProgress()
    with Simulator(require_key=KEY, overload_rate=1.0) as down, Simulator() as gpt:
        openai = f'[[model]]\nprovider = "openai"\nname = "sim"\nbase_url = "{gpt.base_url}"\n'
        job = write_job(tmp_path, model_table(down.url, table="[[model]]") + openai, n=30,
                        limits="concurrency = 8\nretry_budget_s = 5")
        res = Job.from_toml(job).run(progress=progress, on_start=lambda s, t, ls: lanes.extend(ls))
        status = down.stats()["by_status"]
    assert res.counts["done"] == 30 and res.exit_code == 0
    assert {r["_model"] for r in rows_of(res.output_path)} == {"openai:sim"}
    assert set(status) == {"529"} and res.rate_limited == 0
    assert any("circuit breaker for anthropic:claude-haiku-4-5 opened" in m for m in progress.messages)
    assert lanes[0].aimd.limit == 8  # overloaded for everyone: not a reason to send less once it answers again


def test_the_spend_limit_stops_the_run_like_an_exhausted_quota(tmp_path):
    with Simulator(require_key=KEY, quota_tokens=600) as sim:
        job = write_job(tmp_path, model_table(sim.url), n=20, system="You sort people.")
        out = runner.invoke(app, ["run", str(job), "-q"])
        stats = sim.stats()
    assert out.exit_code == 1
    assert "monthly spend limit" in out.output and "raise the spend limit or add credits" in out.output
    spent = stats["by_status"]["429"]
    assert spent <= 4  # the requests in flight when it came back; no retries of it
    with ledger(tmp_path) as db:
        pending = db.execute("SELECT count(*) FROM rows WHERE status = 'pending'").fetchone()[0]
    assert pending > 0  # left for the next run, not failed


# -- packing and prompt caching -------------------------------------------------------------------

def test_packing_with_a_forced_tool(tmp_path, claude):
    job = write_job(tmp_path, model_table(claude.url), n=20, prompt_extra="pack = 5")
    res = Job.from_toml(job).run()
    assert res.counts["done"] == 20 and res.requests == 4 and claude.stats()["requests"] == 4


def test_cache_tokens_are_recorded_priced_and_shown(tmp_path, claude):
    job = write_job(tmp_path, model_table(claude.url), n=12)
    progress, metrics = CountingProgress(), []
    res = Job.from_toml(job).run(progress=progress, on_start=lambda stats, tally, lanes: metrics.append(
        RunMetrics(job="job", stats_fn=lambda: stats, tally_fn=lambda: tally, lanes_fn=lambda: lanes)))
    assert res.counts["done"] == 12 and progress.finished.cache_read_tokens == res.cache_read_tokens > 0
    scraped = {s.labels.get("kind"): s.value for m in metrics[0].collect() if m.name == "llmap_tokens"
               for s in m.samples if s.name == "llmap_tokens_total"}
    assert scraped["cache_read"] == res.cache_read_tokens and scraped["cache_write"] > 0
    with ledger(tmp_path) as db:
        reqs = db.execute("SELECT prompt_tokens, completion_tokens, cache_read_tokens, cache_write_tokens "
                          "FROM requests ORDER BY t").fetchall()
        run_totals = db.execute("SELECT cache_read_tokens, cache_write_tokens, cost_usd FROM runs").fetchone()
    writes = [r for r in reqs if r[3]]
    reads = [r for r in reqs if r[2]]
    assert len(writes) == 1 and len(reads) == 11  # the first request alone wrote the prefix; the rest read it
    assert writes[0] == reqs[0] and writes[0][3] > 1024
    assert run_totals[0] == sum(r[2] for r in reqs) == res.cache_read_tokens and run_totals[1] == writes[0][3]
    spec = Job.from_toml(job).spec.model
    expected = sum(cost_usd(spec, *r) for r in reqs)
    assert res.cost_usd == pytest.approx(expected) and run_totals[2] == pytest.approx(expected)
    assert expected < sum(cost_usd(spec, r[0], r[1]) for r in reqs) * 0.3  # reads at a tenth of price_in
    lines, _ = model_report(Job.from_toml(job).spec)
    assert lines[0].cache_read_tokens == run_totals[0] and lines[0].cost_usd > 0
    summary = build_run_summary(tmp_path / ".llmap" / "job.ledger.sqlite")
    assert summary.cache_read_tokens == run_totals[0] and summary.models[0].cache_read_tokens == run_totals[0]
    rep = runner.invoke(app, ["report", str(job), "--html", str(tmp_path / "r.html")])
    assert rep.exit_code == 0 and "cache reads" in rep.stdout and "prompt-cache reads / writes" in rep.stdout
    assert "Prompt-cache reads" in (tmp_path / "r.html").read_text()


def test_prompt_cache_false_writes_and_reads_nothing(tmp_path, claude):
    job = write_job(tmp_path, model_table(claude.url, extra="prompt_cache = false"), n=6)
    res = Job.from_toml(job).run()
    stats = claude.stats()["tokens"]
    assert res.counts["done"] == 6 and stats["cache_read"] == stats["cache_write"] == 0


# -- failover and cascade across providers -------------------------------------------------------

def test_claude_fails_over_to_openai_when_it_refuses_every_request(tmp_path, claude):
    with Simulator() as gpt:
        openai = (f'[[model]]\nprovider = "openai"\nname = "sim"\nbase_url = "{gpt.base_url}"\n'
                  "price_in = 0.15\nprice_out = 0.6\n")
        job = write_job(tmp_path, model_table(claude.url, name="bad-request-claude", table="[[model]]") + openai, n=10)
        res = Job.from_toml(job).run()
    assert res.counts["done"] == 10 and {r["_model"] for r in rows_of(res.output_path)} == {"openai:sim"}
    assert claude.stats()["by_status"] == {"400": 3}  # three identical refusals: left out, not retried


def test_haiku_escalates_to_sonnet_and_report_costs_each(tmp_path, claude):
    haiku = model_table(claude.url, table="[[model]]", extra='escalate_if = "score < 0.5"')
    sonnet = model_table(claude.url, name="claude-sonnet-4-5", table="[[model]]").replace("price_in = 1.0",
                                                                                          "price_in = 3.0")
    job = write_job(tmp_path, haiku + sonnet, n=20)
    res = Job.from_toml(job).run()
    out = rows_of(res.output_path)
    by = {m: sum(1 for r in out if r["_model"] == m) for m in ("anthropic:claude-haiku-4-5",
                                                                "anthropic:claude-sonnet-4-5")}
    assert res.counts["done"] == 20 and by["anthropic:claude-sonnet-4-5"] > 0 and by["anthropic:claude-haiku-4-5"] > 0
    lines, _ = model_report(Job.from_toml(job).spec)
    costs = {ln.model: ln for ln in lines}
    assert costs["anthropic:claude-haiku-4-5"].escalated == by["anthropic:claude-sonnet-4-5"]
    assert all(ln.cost_usd > 0 for ln in lines)
    rep = runner.invoke(app, ["report", str(job)])
    assert "anthropic:claude-sonnet-4-5" in rep.stdout and "anthropic:claude-haiku-4-5" in rep.stdout


# -- preflight ------------------------------------------------------------------------------------

def test_missing_anthropic_api_key_is_exit_2_with_nothing_sent(tmp_path, claude, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    job = write_job(tmp_path, model_table(claude.url), n=3)
    out = runner.invoke(app, ["run", str(job)])
    assert out.exit_code == 2
    assert "environment variable ANTHROPIC_API_KEY is not set" in out.output
    assert claude.stats()["requests"] == 0


def test_a_wrong_key_or_unknown_model_is_exit_2_before_any_message(tmp_path, claude, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-wrong")
    job = write_job(tmp_path, model_table(claude.url), n=3)
    out = runner.invoke(app, ["run", str(job)])
    assert out.exit_code == 2 and "rejected the key in $ANTHROPIC_API_KEY (HTTP 401: invalid x-api-key)" in out.output
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    job = write_job(tmp_path, model_table(claude.url, name="missing-model-claude"), n=3)
    out = runner.invoke(app, ["run", str(job)])
    assert out.exit_code == 2 and "does not know model 'missing-model-claude'" in out.output
    assert claude.stats()["requests"] == 0  # GET /v1/models/{id} only: no message was sent


def test_llmap_map_picks_anthropic_for_a_claude_model(claude, tmp_path):
    rows = [{"name": "Laramie County School District #1"}, {"name": "Cody Charter Academy"}]
    out = llmap.map(rows, prompt="District: {{ name }}", model="claude-haiku-4-5", base_url=claude.url,
                    fields={"kind": {"type": "string", "enum": ["county", "charter", "other"]}})
    assert [r["_status"] for r in out] == ["done", "done"]
    assert {r["_model"] for r in out} == {"anthropic:claude-haiku-4-5"}
    assert claude.stats()["requests"] == 2


# -- estimate -------------------------------------------------------------------------------------

def test_estimate_assumes_every_request_after_the_first_reads_the_prefix(tmp_path, claude):
    from llmap.observe.estimate.rows import estimate
    from llmap.observe.estimate.table import estimate_text

    job = write_job(tmp_path, model_table(claude.url), n=40)
    spec = Job.from_toml(job).spec
    est = estimate(spec)
    prefix = -(-len(SYSTEM) // 4)  # ceil(chars / 4.0)
    assert est.prefix_chars == len(SYSTEM) and est.requests == 40
    assert est.cache_read_tokens == prefix * 39 and est.models[0].cache_write_tokens == prefix
    assert est.cost_usd == pytest.approx(cost_usd(spec.model, est.prompt_tokens, est.completion_tokens,
                                                  prefix * 39, prefix))
    assert "of them prompt-cache reads" in estimate_text(est) and claude.stats()["requests"] == 0
    # without prompt caching, or with a system prompt that reads a column, nothing is assumed cached
    no_cache = estimate(Job.from_toml(write_job(tmp_path, model_table(claude.url, extra="prompt_cache = false"),
                                                n=40)).spec)
    assert no_cache.cache_read_tokens == 0 and no_cache.cost_usd > 1.5 * est.cost_usd
    per_row = estimate(Job.from_toml(write_job(tmp_path, model_table(claude.url), n=40,
                                               system=SYSTEM + " {{ city }}")).spec)
    assert per_row.prefix_chars == 0 and per_row.cache_read_tokens == 0


def test_the_run_summary_says_how_much_was_read_from_the_prompt_cache(tmp_path, claude):
    job = write_job(tmp_path, model_table(claude.url), n=4)
    out = runner.invoke(app, ["run", str(job), "-q"])
    assert out.exit_code == 0
    reads = claude.stats()["tokens"]["cache_read"]
    assert reads > 0 and f"({reads:,} read from the prompt cache)" in out.output
