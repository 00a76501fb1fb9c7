"""``llmap eval`` on the simulator's calibrated models: the truth is known (``[eval] gold``), so accuracy, the
confidence of right and wrong answers, the ECE and the ranking of models can be checked against what the
simulator was set to do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from _support import chat_requests, write_csv
from llmap import Job
from llmap.cli import app
from llmap.prompt.schema import OutputSchema
from llmap.sim import Simulator
from llmap.sim.calibrated import CURVES, true_ece, truth
from llmap.spec import FieldSpec

KINDS = ["a", "b", "c", "d"]
FIELDS = {"kind": FieldSpec(type="string", enum=KINDS)}
runner = CliRunner()


def _rows(n: int) -> list[dict]:
    schema = OutputSchema(FIELDS).json_schema
    return [{"id": i, "text": f"item {i}", "true_kind": truth(schema, f"item {i}")["kind"]} for i in range(n)]


def _job(tmp_path: Path, base_url: str, n: int, *, pack: int = 1, extra: str = "") -> Path:
    write_csv(tmp_path / "t.csv", _rows(n))
    job = tmp_path / "job.toml"
    job.write_text(f'''
[input]
path = "t.csv"
key = "id"
[prompt]
user = "{{{{ text }}}}"
pack = {pack}
[output]
path = "out.parquet"
[output.fields]
kind = {{ type = "string", enum = {json.dumps(KINDS)} }}
[model]
provider = "openai"
name = "m"
base_url = "{base_url}"
[limits]
concurrency = 16
[eval]
gold = {{ kind = "true_kind" }}
{extra}
''', encoding="utf-8")
    return job


def _eval_json(job: Path, *args: str) -> dict:
    out = runner.invoke(app, ["eval", str(job), "--json", *args])
    assert out.exit_code == 0, out.output
    return json.loads(out.stdout)


@pytest.mark.parametrize(("curve", "pack"), [("well", 1), ("over", 1), ("well", 8)])
def test_confidence_is_lower_on_wrong_answers_and_eval_ece_matches_the_simulators_calibration(tmp_path, curve, pack):
    accuracy, n = 0.75, 1500
    with Simulator(accuracy=accuracy, calibration=curve) as sim:
        job = _job(tmp_path, sim.base_url, n, pack=pack)
        res = Job.from_toml(job).run()
        assert res.counts["done"] == n
    rep = _eval_json(job)
    kind = rep["fields"]["kind"]
    assert kind["accuracy_n"] == n and 0 <= kind["accuracy_low"] <= kind["accuracy"] <= kind["accuracy_high"] <= 1
    assert abs(kind["accuracy"] - accuracy) < 0.04  # 1,500 rows: the 95% interval is about ±0.022
    cal = rep["calibration"]
    assert cal["n"] == n and cal["fields"] == ["kind"]
    assert cal["mean_confidence_wrong"] < cal["mean_confidence_right"] - 0.05
    expected = true_ece(accuracy, CURVES[curve])
    assert abs(cal["ece"] - expected) <= 0.05, (cal["ece"], expected)
    if curve == "over":
        assert cal["ece"] > 0.08  # over-confidence shows; a well calibrated model's is near 0
    assert sum(b["n"] for b in cal["bins"]) == n


def test_eval_json_counts_only_done_rows_and_gives_per_class_figures_and_the_confusion_matrix(tmp_path):
    with Simulator(accuracy=0.8) as sim:
        job = _job(tmp_path, sim.base_url, 200)
        Job.from_toml(job).run()
    labels = tmp_path / "labels.csv"  # a person's labels win over the gold column, and may name unknown keys
    write_csv(labels, [{"id": 0, "kind": "A", "note": "ignored"}, {"id": 999, "kind": "b", "note": ""}])
    out = runner.invoke(app, ["label", str(job), str(labels)])
    assert out.exit_code == 0, out.output
    assert "2 values from 2 rows" in out.stdout and "1 of 2 keys are not in the ledger" in out.stdout
    assert "ignored columns: note" in out.stdout
    rep = _eval_json(job)
    kind = rep["fields"]["kind"]
    assert rep["labels_elsewhere"] == 1 and kind["sources"] == {"labels.csv": 1, "gold:true_kind": 199}
    assert isinstance(kind["accuracy"], float) and kind["accuracy"] == kind["accuracy_k"] / kind["accuracy_n"]
    assert kind["confusion"]["labels"] == KINDS and sum(map(sum, kind["confusion"]["matrix"])) == 200
    assert [c["class"] for c in kind["classes"]] == KINDS
    assert sum(c["support"] for c in kind["classes"]) == 200
    for c in kind["classes"]:
        assert c["precision_low"] <= c["precision"] <= c["precision_high"] and c["recall_n"] == c["support"]
    text = runner.invoke(app, ["eval", str(job)]).stdout
    assert "confusion matrix" in text and "reliability table" in text and "ECE" in text


def test_labelled_rows_that_failed_are_counted_apart_not_as_wrong(tmp_path):
    with Simulator(accuracy=0.8) as sim:
        job = _job(tmp_path, sim.base_url, 40)
        Job.from_toml(job).run()
        sim.reconfigure(fail_rate=1.0)
        text = job.read_text().replace('user = "{{ text }}"', 'user = "again {{ text }}"')
        job.write_text(text.replace("concurrency = 16", "concurrency = 16\nretry_budget_s = 0.5\nmax_attempts = 1"))
        res = Job.from_toml(job).run()
        assert res.counts["failed"] == 40
    kind = _eval_json(job)["fields"]["kind"]
    assert kind["labelled"] == 40 and kind["failed"] == 40 and kind["done"] == 0
    assert kind["accuracy"] is None and kind["accuracy_n"] == 0


def test_eval_models_ranks_three_models_of_known_accuracy_and_prices_cost_per_correct_answer(tmp_path):
    extra = "\n".join(f'''[[eval.models]]
provider = "openai"
name = "{name}"
base_url = "BASE"
price_in = {pin}
price_out = {pout}
''' for name, pin, pout in (("cheap", 0.1, 0.4), ("mid", 1.0, 4.0), ("best", 10.0, 40.0)))
    with Simulator(model_accuracy="cheap=0.6,mid=0.8,best=0.95") as sim:
        job = _job(tmp_path, sim.base_url, 400, extra=extra.replace("BASE", sim.base_url))
        Job.from_toml(job).run()  # the job's own model (accuracy: the plain simulator's)
        sent = chat_requests(sim)
        rep = _eval_json(job, "--models", "mid,best,cheap", "--sample", "300")
        assert chat_requests(sim) == sent + 3 * 300
        again = _eval_json(job, "--models", "mid,best,cheap", "--sample", "300")
        assert chat_requests(sim) == sent + 3 * 300  # a rerun is answered by the ledgers and the cache
        out = runner.invoke(app, ["eval", str(job), "--models", "mid,best,cheap", "--sample", "300"])
    assert out.exit_code == 0, out.output
    assert "USD per correct" in out.stdout and "most accurate: openai:best" in out.stdout
    models = rep["models"]
    assert [m["model"] for m in models] == ["openai:best", "openai:mid", "openai:cheap"]
    assert [m["rank"] for m in models] == [1, 2, 3] and all(m["sample"] == 300 for m in models)
    for m, acc in zip(models, (0.95, 0.8, 0.6), strict=True):
        assert abs(m["accuracy"] - acc) < 0.08, m  # 300 rows: about ±0.055 at 95%
        assert m["cost_per_correct_usd"] == pytest.approx(m["cost_usd"] / m["correct"])
        assert m["latency_s"] is not None and m["requests"] == 300
    costs = [m["cost_usd"] for m in models]
    assert costs[0] > costs[1] > costs[2] > 0
    assert [m["cost_usd"] for m in again["models"]] == costs and all(m["requests"] == 0 for m in again["models"])


def test_eval_without_labels_says_how_to_add_them(tmp_path, sim):
    job = _job(tmp_path, sim.base_url, 5)
    job.write_text(job.read_text().replace('gold = { kind = "true_kind" }', ""))
    Job.from_toml(job).run()
    out = runner.invoke(app, ["eval", str(job)])
    assert out.exit_code == 2 and "has no labels" in out.stderr and "llmap label" in out.stderr
