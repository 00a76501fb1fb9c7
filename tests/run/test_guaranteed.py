"""A cascade with a guarantee, end to end against the simulator's calibrated models (the oracle is the truth)."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from _support import LLMAP
from llmap import Job
from llmap.errors import SpecError
from llmap.observe.progress import CountingProgress
from llmap.prompt.schema import OutputSchema
from llmap.sim import Simulator
from llmap.sim.calibrated import decide, truth
from llmap.spec import FieldSpec

ENUM = ["a", "b", "c", "d"]
KIND = {"kind": FieldSpec(type="string", enum=ENUM)}
FLAG = {"keep": FieldSpec(type="boolean")}


def texts(n: int, tag: str = "row") -> dict[str, str]:
    return {f"r{i:05d}": f"{tag} text {i}" for i in range(n)}


def write_rows(folder: Path, rows: dict[str, str]) -> None:
    with open(folder / "rows.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows(rows.items())


def write_job(folder: Path, base_url: str, *, cascade: str, fields: str = 'kind = { type = "string", enum = '
              '["a", "b", "c", "d"] }', proxy_extra: str = "", oracle_extra: str = "", top: str = "",
              prompt_extra: str = "") -> Path:
    job = folder / "job.toml"
    job.write_text(f"""name = "job"
{top}
[input]
path = "rows.csv"
key = "id"
[prompt]
user = "{{{{ text }}}}"
{prompt_extra}
[output]
path = "out/result.parquet"
[output.fields]
{fields}
[[model]]
provider = "openai"
name = "proxy"
base_url = "{base_url}"
price_in = 0.15
price_out = 0.6
{proxy_extra}
[[model]]
provider = "openai"
name = "oracle"
base_url = "{base_url}"
price_in = 2.5
price_out = 10
{oracle_extra}
[cascade]
{cascade}
[limits]
concurrency = 16
""", encoding="utf-8")
    return job


def run(job: Path, **kw):
    progress = CountingProgress()
    result = Job.from_toml(job).run(progress=progress, **kw)
    return result, progress.messages


def output(folder: Path) -> dict[str, dict]:
    return {r["id"]: r for r in pq.read_table(folder / "out" / "result.parquet").to_pylist()}


def agreement(rows: dict[str, dict], source: dict[str, str], fields=KIND, name: str = "kind") -> float:
    schema = OutputSchema(fields).json_schema
    return sum(r[name] == truth(schema, source[k])[name] for k, r in rows.items()) / len(rows)


def ledger(folder: Path) -> sqlite3.Connection:
    return sqlite3.connect(folder / ".llmap" / "job.ledger.sqlite")


def by_model(sim: Simulator) -> dict[str, int]:
    return dict(sim.stats()["by_model"])


def test_the_cascade_meets_its_target_calls_the_oracle_on_fewer_rows_and_a_rerun_sends_nothing(tmp_path):
    rows = texts(1200)
    write_rows(tmp_path, rows)
    with Simulator(model_accuracy="proxy=0.83,oracle=1", calibration="well") as sim:
        job = write_job(tmp_path, sim.base_url, cascade="target = 0.9\ndelta = 0.1\nlabel_budget = 250")
        result, said = run(job)
        assert result.exit_code == 0, result.stop_reason
        out = output(tmp_path)
        assert agreement(out, rows) >= 0.9
        with ledger(tmp_path) as db:
            (threshold, choice), = db.execute("SELECT threshold, choice FROM cascade_decisions").fetchall()
            sampled = {k for (k,) in db.execute("SELECT key FROM cascade_rows WHERE sampled = 1")}
        choice = json.loads(choice)
        kept = {k for k, r in out.items() if r["_model"] == "openai:proxy"}
        assert len(sampled) == 250 and not kept & sampled
        assert all(out[k]["_confidence"] >= threshold for k in kept)
        assert all(out[k]["_model"] == "openai:oracle" for k in sampled)
        assert len(kept) == choice["kept"] and 0.3 * len(rows) < len(kept) < len(rows) - 250
        # the proxy answered every row once; the oracle only the rows it settled (sampled or below the threshold)
        assert by_model(sim) == {"proxy": 1200, "oracle": 1200 - len(kept)}
        assert any("threshold" in m and "agreement >=" in m for m in said)
        again, _ = run(job)
        assert again.requests == 0 and by_model(sim) == {"proxy": 1200, "oracle": 1200 - len(kept)}
        assert output(tmp_path) == out


def test_packing_reaches_the_same_decision_as_one_row_per_request(tmp_path):
    rows = texts(600)
    outs = []
    with Simulator(model_accuracy="proxy=0.85,oracle=1") as sim:
        for pack in (1, 12):
            folder = tmp_path / f"pack{pack}"
            folder.mkdir()
            write_rows(folder, rows)
            job = write_job(folder, sim.base_url, cascade="target = 0.9\ndelta = 0.1\nlabel_budget = 150",
                            prompt_extra=f"pack = {pack}")
            sim.reset_stats()
            result, _ = run(job)
            assert result.exit_code == 0
            with ledger(folder) as db:
                threshold = db.execute("SELECT threshold FROM cascade_decisions").fetchone()[0]
            outs.append((threshold, {k: r["_model"] for k, r in output(folder).items()}))
            if pack > 1:
                assert sim.stats()["requests"] < 600 / 2  # packs, not rows
    assert outs[0] == outs[1]


@pytest.mark.parametrize("field_kind", ["precision", "recall"])
def test_precision_or_recall_of_a_boolean_filter_field(tmp_path, field_kind):
    rows = texts(1000)
    write_rows(tmp_path, rows)
    with Simulator(model_accuracy="proxy=0.85,oracle=1") as sim:
        job = write_job(tmp_path, sim.base_url, fields='keep = { type = "boolean" }',
                        cascade=f'guarantee = "{field_kind}"\ntarget = 0.9\ndelta = 0.1\nlabel_budget = 250')
        result, _ = run(job)
        assert result.exit_code == 0
    out = output(tmp_path)
    schema = OutputSchema(FLAG).json_schema
    true = {k: truth(schema, rows[k])["keep"] for k in rows}
    tp = sum(out[k]["keep"] and true[k] for k in rows)
    rate = tp / sum(out[k]["keep"] for k in rows) if field_kind == "precision" else tp / sum(true.values())
    assert rate >= 0.9
    assert sum(r["_model"] == "openai:proxy" for r in out.values()) > 100  # it kept proxy answers


def test_a_filter_with_a_precision_guarantee_exports_the_kept_rows(tmp_path):
    rows = texts(1000)
    write_rows(tmp_path, rows)
    with Simulator(model_accuracy="proxy=0.85,oracle=1") as sim:
        job = write_job(tmp_path, sim.base_url, fields='keep = { type = "boolean" }', top='kind = "filter"',
                        cascade='guarantee = "precision"\ntarget = 0.9\ndelta = 0.1\nlabel_budget = 250')
        result, _ = run(job)
        assert result.exit_code == 0
    out = output(tmp_path)
    schema = OutputSchema(FLAG).json_schema
    true = {k: truth(schema, rows[k])["keep"] for k in rows}
    assert out and all(r["keep"] for r in out.values())  # the export holds the kept rows only
    assert sum(true[k] for k in out) / len(out) >= 0.9
    assert any(r["_model"] == "openai:proxy" for r in out.values())


@pytest.mark.parametrize(("top", "fields", "cascade", "says"), [
    ('kind = "filter"', 'keep = { type = "boolean" }\nurgent = { type = "boolean" }\n[filter]\nfield = "keep"',
     'guarantee = "precision"\nfield = "urgent"\ntarget = 0.9', "not the field the filter decides by"),
    ('kind = "reduce"', 'summary = { type = "string" }', 'guarantee = "agreement"\ntarget = 0.9',
     "kind = 'reduce'"),
])
def test_a_cascade_the_operator_cannot_keep_is_refused_before_any_request(tmp_path, top, fields, cascade, says):
    write_rows(tmp_path, texts(10))
    with Simulator() as sim:
        job = write_job(tmp_path, sim.base_url, fields=fields, top=top, cascade=cascade)
        with pytest.raises(SpecError, match=says):
            Job.from_toml(job).run()
        assert sim.stats()["requests"] == 0


def test_a_proxy_without_confidence_stops_with_a_message_then_escalates_all_without_a_new_sample(tmp_path):
    rows = texts(300)
    write_rows(tmp_path, rows)
    with Simulator(refuse_logprobs=True) as sim:
        job = write_job(tmp_path, sim.base_url, cascade="target = 0.9\nlabel_budget = 40")
        result, _ = run(job)
        assert result.exit_code == 1
        assert "no threshold meets agreement >= 0.9" in result.stop_reason
        assert "returned no log-probabilities" in result.stop_reason and "escalate_all" in result.stop_reason
        assert result.counts["pending"] == 300  # no row kept quietly
        sent = by_model(sim)
        assert sent["proxy"] >= 300 and "oracle" not in sent  # no oracle call spent on a sample that could not help
        text = job.read_text(encoding="utf-8").replace("[cascade]\n", '[cascade]\non_miss = "escalate_all"\n')
        job.write_text(text, encoding="utf-8")
        result, said = run(job)
        assert result.exit_code == 0 and result.counts["done"] == 300
        after = by_model(sim)
        assert after["proxy"] == sent["proxy"]  # no proxy call again
        assert 300 <= after["oracle"] <= 301  # every row once (and one request refused for logprobs)
        assert not any("drew a sample" in m for m in said)
    with ledger(tmp_path) as db:
        assert db.execute("SELECT count(*) FROM cascade_decisions").fetchone()[0] == 1
    assert {r["_model"] for r in output(tmp_path).values()} == {"openai:oracle"}


def test_an_incremental_run_reuses_the_threshold_while_its_bound_holds_and_draws_again_when_not(tmp_path):
    rows = texts(1000)
    write_rows(tmp_path, rows)
    with Simulator(model_accuracy="proxy=0.85,oracle=1") as sim:
        job = write_job(tmp_path, sim.base_url, cascade="target = 0.9\ndelta = 0.1\nlabel_budget = 200")
        assert run(job)[0].exit_code == 0
        with ledger(tmp_path) as db:
            threshold = db.execute("SELECT threshold FROM cascade_decisions").fetchone()[0]
        # change 5 rows to texts the proxy scores below the threshold: they go to the oracle, the bound holds
        low = [t for t in (f"changed text {i}" for i in range(400))
               if decide("proxy", t, "kind", 0.85, 1.0)[0] < threshold][:5]
        changed = dict(zip(list(rows)[:5], low, strict=True))
        write_rows(tmp_path, {**rows, **changed})
        sim.reset_stats()
        result, said = run(job)
        assert result.exit_code == 0
        assert any("5 rows changed or new" in m and "still holds" in m for m in said), said
        assert by_model(sim) == {"proxy": 5, "oracle": 5}
        # change 300 rows: the threshold no longer holds with them; a new sample over every row
        many = {k: f"other text {i}" for i, k in enumerate(list(rows)[100:400])}
        now = {**rows, **changed, **many}
        write_rows(tmp_path, now)
        sim.reset_stats()
        result, said = run(job)
        assert result.exit_code == 0
        assert any("no longer holds" in m for m in said) and any("drew a sample of 200 of 1,000" in m for m in said)
        assert by_model(sim)["proxy"] == 300
        assert agreement(output(tmp_path), now) >= 0.9
    with ledger(tmp_path) as db:
        assert db.execute("SELECT count(*) FROM cascade_decisions").fetchone()[0] == 2
        reuses = json.loads(db.execute("SELECT reuses FROM cascade_decisions ORDER BY id LIMIT 1").fetchone()[0])
    assert reuses[0]["changed"] == 5 and reuses[0]["kept"] == 0


def test_a_higher_target_decides_again_and_sends_rows_kept_earlier_to_the_oracle(tmp_path):
    rows = texts(800)
    write_rows(tmp_path, rows)
    with Simulator(model_accuracy="proxy=0.85,oracle=1") as sim:
        job = write_job(tmp_path, sim.base_url, cascade="target = 0.85\ndelta = 0.1\nlabel_budget = 200")
        assert run(job)[0].exit_code == 0
        first = output(tmp_path)
        job.write_text(job.read_text(encoding="utf-8").replace("target = 0.85", "target = 0.95"), encoding="utf-8")
        sent = by_model(sim)
        result, said = run(job)
        assert result.exit_code == 0
        second = output(tmp_path)
        assert agreement(second, rows) >= 0.95
        moved = {k for k in rows if first[k]["_model"] == "openai:proxy" and second[k]["_model"] == "openai:oracle"}
        assert moved and any(f"{len(moved):,} rows kept earlier go to the oracle" in m for m in said), said
        after = by_model(sim)
        assert after["proxy"] == sent["proxy"]  # the proxy's answers are kept in the ledger
        # the same sample (the same rows and seed): nothing new to label; the oracle answers only the moved rows
        assert after["oracle"] - sent["oracle"] == len(moved)


def test_status_report_and_html_show_the_threshold_bound_rows_and_cost(tmp_path, capsys):
    from typer.testing import CliRunner

    from llmap.cli import app

    rows = texts(400)
    write_rows(tmp_path, rows)
    with Simulator(model_accuracy="proxy=0.85,oracle=1") as sim:
        job = write_job(tmp_path, sim.base_url, cascade="target = 0.85\ndelta = 0.1\nlabel_budget = 100")
        assert run(job)[0].exit_code == 0
    cli = CliRunner()
    status = cli.invoke(app, ["status", str(job), "--json"])
    doc = json.loads(status.stdout)["cascade"]
    assert doc["decision"]["state"] == "decided" and doc["decision"]["choice"]["bound"] >= 0.85
    assert doc["kept"] + doc["sampled"] + doc["escalated"] == 400 and doc["sampled"] == 100
    assert 0 < doc["cost_ratio"] < 1
    text = cli.invoke(app, ["status", str(job)]).stdout
    assert "threshold" in text and "kept (the proxy's answer)" in text and "for the oracle on every row" in text
    report = cli.invoke(app, ["report", str(job), "--html", str(tmp_path / "r.html")])
    assert report.exit_code == 0 and "interval [" in report.stdout
    html = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert 'id="cascade"' in html and "Rows kept / sampled / escalated" in html


# -- SIGKILL after the sample was drawn: the rerun draws no new sample, asks the proxy nothing again, and asks the
# oracle only for rows it had not answered.
KILL_N, BUDGET, CONCURRENCY = 600, 200, 4


def _state(path) -> tuple[list, list, int]:
    """(decisions, sampled keys, sampled rows done) in the ledger, read while the run writes it."""
    if not path.exists():
        return [], [], 0
    try:
        with sqlite3.connect(path) as db:
            decisions = db.execute("SELECT id, population, sample FROM cascade_decisions").fetchall()
            sampled = sorted(k for (k,) in db.execute("SELECT key FROM cascade_rows WHERE sampled = 1"))
            done = db.execute("SELECT count(*) FROM rows r JOIN cascade_rows c ON c.key = r.key "
                              "WHERE c.sampled = 1 AND r.status = 'done'").fetchone()[0]
        return decisions, sampled, done
    except sqlite3.OperationalError:
        return [], [], 0


def test_sigkill_after_the_sample_was_drawn_then_rerun_neither_samples_nor_pays_again(tmp_path):
    rows = texts(KILL_N)
    write_rows(tmp_path, rows)
    with Simulator(model_accuracy="proxy=0.85,oracle=1", latency_median=0.02) as sim:
        job = write_job(tmp_path, sim.base_url, cascade=f"target = 0.9\ndelta = 0.1\nlabel_budget = {BUDGET}")
        job.write_text(job.read_text(encoding="utf-8").replace("concurrency = 16", f"concurrency = {CONCURRENCY}"),
                       encoding="utf-8")
        ledger = tmp_path / ".llmap" / "job.ledger.sqlite"
        proc = subprocess.Popen([*LLMAP, "run", str(job), "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            decisions, _, done = _state(ledger)
            if decisions and done >= 20:
                break
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)  # llmap's own process
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
        decisions, sampled, done = _state(ledger)
        assert len(decisions) == 1 and len(sampled) == BUDGET and 20 <= done < BUDGET, "kill during the sample"
        with sqlite3.connect(ledger) as db:
            settled = {k for (k,) in db.execute("SELECT key FROM rows WHERE status = 'done'")}
        first = dict(sim.stats()["by_model"])
        assert first["proxy"] >= KILL_N  # the proxy had answered every row before the sample was drawn

        rerun = subprocess.run([*LLMAP, "run", str(job), "-q"], capture_output=True, text=True, timeout=180)
        assert rerun.returncode == 0, rerun.stderr
        after = dict(sim.stats()["by_model"])
        assert _state(ledger)[:2] == (decisions, sampled)  # the same decision and sample: nothing drawn again
        assert after["proxy"] == first["proxy"]  # the proxy asked nothing again
        out = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "result.parquet").to_pylist()}
        by_oracle = {k for k, r in out.items() if r["_model"] == "openai:oracle"}
        again = after["oracle"] - first["oracle"]
        assert again <= len(by_oracle - settled)  # no row the oracle had settled was asked again
        assert first["oracle"] + again - len(by_oracle) <= CONCURRENCY  # only answers in flight at the kill repeat
        assert agreement(out, rows) >= 0.9


@pytest.mark.parametrize("which", ["oracle", "both"])
def test_the_oracle_and_the_proxy_can_go_by_batch_at_half_price(tmp_path, which):
    rows = texts(500)
    write_rows(tmp_path, rows)
    with Simulator(model_accuracy="proxy=0.85,oracle=1", batch_time=0.2) as sim:
        job = write_job(tmp_path, sim.base_url, cascade="target = 0.9\ndelta = 0.1\nlabel_budget = 120",
                        oracle_extra="batch = true", proxy_extra="batch = true" if which == "both" else "",
                        top="")
        job.write_text(job.read_text(encoding="utf-8") + "[batch]\npoll_s = 0.05\n", encoding="utf-8")
        result, _ = run(job)
        assert result.exit_code == 0, result.stop_reason
        assert sim.stats()["batches"]["created"] == (3 if which == "both" else 2)  # (proxy,) sample, the rest
    out = output(tmp_path)
    assert agreement(out, rows) >= 0.9
    with ledger(tmp_path) as db:
        paths = dict(db.execute("SELECT model || ' ' || coalesce(path, 'realtime'), sum(pack_size) FROM requests "
                                "WHERE outcome = '200' GROUP BY 1"))
    oracle_rows = sum(r["_model"] == "openai:oracle" for r in out.values())
    assert paths["openai:oracle batch"] == oracle_rows and "openai:oracle realtime" not in paths
    assert paths[f"openai:proxy {'batch' if which == 'both' else 'realtime'}"] == 500


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_with_ray_the_workers_send_and_the_driver_decides(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    from llmap.run.ray import launch as starts

    launched: list[list[str]] = []  # each phase's workers, by the models they were started with
    real = starts.Launch.__init__

    def launch(self, spec, **kw):
        launched.append([m.name for m in spec.models])
        real(self, spec, **kw)

    monkeypatch.setattr(starts.Launch, "__init__", launch)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never another's cluster
    try:
        rows = texts(400)
        write_rows(tmp_path, rows)
        with Simulator(model_accuracy="proxy=0.85,oracle=1") as sim:
            job = write_job(tmp_path, sim.base_url, cascade="target = 0.9\ndelta = 0.1\nlabel_budget = 100")
            result, _ = run(job, executor="ray", workers=2)
            assert result.exit_code == 0, result.stop_reason
            kept = sum(r["_model"] == "openai:proxy" for r in output(tmp_path).values())
            assert by_model(sim) == {"proxy": 400, "oracle": 400 - kept} and kept > 0
        assert launched == [["proxy"], ["oracle"], ["oracle"]]  # the proxy's phase, the sample, the rest
        assert agreement(output(tmp_path), rows) >= 0.9
        with ledger(tmp_path) as db:
            assert db.execute("SELECT state FROM cascade_decisions").fetchone()[0] == "decided"
    finally:
        ray.shutdown()
