"""``llmap review`` (seeded, stratified samples) and ``llmap label`` (label files) through the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from _support import write_csv
from llmap import Job
from llmap.cli import app
from llmap.quality.review import allocate

runner = CliRunner()


def test_allocation_shares_equally_and_gives_a_small_groups_rest_to_the_others():
    assert allocate({"a": 50, "b": 2, "c": 9}, 12) == {"a": 5, "b": 2, "c": 5}
    assert allocate({"a": 50, "b": 2, "c": 9}, 100) == {"a": 50, "b": 2, "c": 9}
    assert sum(allocate({"a": 7, "b": 7, "c": 7}, 10).values()) == 10


@pytest.fixture
def done_job(tmp_path: Path, sim) -> Path:
    rows = [{"id": i, "text": f"t{i}", "group": "rare" if i % 20 == 0 else "common"} for i in range(100)]
    write_csv(tmp_path / "t.csv", rows)
    job = tmp_path / "job.toml"
    job.write_text(f'''
[input]
path = "t.csv"
key = "id"
[prompt]
user = "{{{{ text }}}}"
[output]
path = "out.parquet"
keep = ["group"]
[output.fields]
kind = {{ type = "string", enum = ["a", "b", "c"] }}
flag = {{ type = "boolean" }}
[model]
provider = "openai"
name = "sim"
base_url = "{sim.base_url}"
''', encoding="utf-8")
    assert Job.from_toml(job).run().counts["done"] == 100
    return job


def _read(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_review_is_seeded_and_stratified_and_labels_read_back(done_job, tmp_path):
    out = runner.invoke(app, ["review", str(done_job), "-n", "10", "--stratify", "group", "-o",
                              str(tmp_path / "r.csv")])
    assert out.exit_code == 0, out.output
    assert "by group: common: 5, rare: 5" in out.stdout and "llmap label" in out.stdout
    rows = _read(tmp_path / "r.csv")
    assert len(rows) == 10 and sum(r["group"] == "rare" for r in rows) == 5  # 5 of the 5 rare rows
    assert list(rows[0])[:6] == ["id", "kind", "flag", "_status", "_confidence", "_error"]
    assert {r["flag"] for r in rows} <= {"true", "false"}
    again = runner.invoke(app, ["review", str(done_job), "-n", "10", "--stratify", "group", "-o",
                                str(tmp_path / "r2.csv")])
    assert again.exit_code == 0 and _read(tmp_path / "r2.csv") == rows  # the same seed draws the same rows
    other = runner.invoke(app, ["review", str(done_job), "-n", "10", "--seed", "7", "-o", str(tmp_path / "r3.csv")])
    assert other.exit_code == 0 and [r["id"] for r in _read(tmp_path / "r3.csv")] != [r["id"] for r in rows]
    refused = runner.invoke(app, ["review", str(done_job), "-n", "10", "-o", str(tmp_path / "r.csv")])
    assert refused.exit_code == 2 and "exists" in refused.stderr  # never overwrites corrections
    # correct one answer, read the file back: every reviewed row is labelled
    rows[0]["kind"] = {"a": "b", "b": "c", "c": "a"}[rows[0]["kind"]]
    with open(tmp_path / "r.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lab = runner.invoke(app, ["label", str(done_job), str(tmp_path / "r.csv")])
    assert lab.exit_code == 0, lab.output
    assert "20 values from 10 rows" in lab.stdout
    rep = json.loads(runner.invoke(app, ["eval", str(done_job), "--json"]).stdout)
    assert rep["fields"]["kind"]["accuracy_n"] == 10 and rep["fields"]["kind"]["accuracy_k"] == 9
    assert rep["fields"]["flag"]["accuracy"] == 1.0
    # the next review leaves labelled rows out
    nxt = runner.invoke(app, ["review", str(done_job), "-n", "100", "-o", str(tmp_path / "r4.csv")])
    assert nxt.exit_code == 0 and len(_read(tmp_path / "r4.csv")) == 90


def test_review_where_filters_with_sql(done_job, tmp_path):
    out = runner.invoke(app, ["review", str(done_job), "-n", "50", "--where", "kind = 'a' AND _confidence < 2",
                              "-o", str(tmp_path / "w.jsonl")])
    assert out.exit_code == 0, out.output
    rows = [json.loads(x) for x in (tmp_path / "w.jsonl").read_text().splitlines()]
    assert rows and all(r["kind"] == "a" for r in rows)
    bad = runner.invoke(app, ["review", str(done_job), "--where", "knd = 'a'", "-o", str(tmp_path / "x.csv")])
    assert bad.exit_code == 2 and "--where" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("content", "words"), [
    ("id,kind\n1,zebra\n", "labels.csv:2: column 'kind': 'zebra' is not one of 'a', 'b', 'c'"),
    ("key,kind\n1,a\n", "no column 'id'"),
    ("id,note\n1,x\n", "no column is named as an output field"),
    ("id,kind\n1,a\n1,b\n", "labels.csv:3: key '1' appears twice (first on line 2)"),
    ("id,flag\n1,maybe\n", "'maybe' is not a boolean"),
])
def test_a_bad_label_file_is_one_line_exit_2(done_job, tmp_path, content, words):
    (tmp_path / "labels.csv").write_text(content)
    out = runner.invoke(app, ["label", str(done_job), str(tmp_path / "labels.csv")])
    assert out.exit_code == 2 and words in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_labels_from_jsonl_are_typed_and_case_is_forgiven(done_job, tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"id": 3, "kind": "B", "flag": "yes"}\n{"id": 4, "kind": null}\n')
    out = runner.invoke(app, ["label", str(done_job), str(path), "--source", "alice"])
    assert out.exit_code == 0, out.output
    from llmap.store.labels import read_labels
    from llmap.store.ledger import Ledger

    with Ledger(done_job.parent / ".llmap" / "job.ledger.sqlite") as led:
        labels = {(lb.key, lb.field): (lb.value, lb.source) for lb in read_labels(led.connection)}
    assert labels == {("3", "kind"): ("b", "alice"), ("3", "flag"): (True, "alice"), ("4", "kind"): (None, "alice")}
