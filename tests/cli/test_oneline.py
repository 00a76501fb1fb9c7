"""The one-line run: ``llmap run DATA --prompt ... --field ...``, the same job as a job file, resumable."""

from __future__ import annotations

import csv
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from _support import SHARED_DATA, chat_requests, people, write_csv
from llmap.cli import app
from llmap.cli.oneline import parse_field
from llmap.errors import SpecError

DISTRICTS = SHARED_DATA / "districts_2023_24_nces.csv"
runner = CliRunner()
PROMPT = "District: {{ district_name }} ({{ state }})"
FIELDS = ["--field", "kind=enum:city,county,other", "--field", "note=string"]


def _line(sim, data: Path, *extra: str) -> list[str]:
    return ["run", str(data), "--prompt", PROMPT, *FIELDS, "--model", "sim", "--base-url", sim.base_url, *extra]


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: v for k, v in r.items() if k != "_source"} for r in csv.DictReader(f)]


@pytest.mark.skipif(not DISTRICTS.is_file(), reason="needs ../shared/data beside the repository")
def test_the_one_line_run_equals_the_job_file_and_reruns_with_no_request(tmp_path, sim, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = _line(sim, DISTRICTS, "--where", "state = 'WY'", "--output", "line.csv")
    res = runner.invoke(app, line)
    assert res.exit_code == 0, res.output
    assert chat_requests(sim) == 61 and "61 done, 0 failed" in res.stderr
    res = runner.invoke(app, line)  # the same line: the same ledger, nothing to ask
    assert res.exit_code == 0 and chat_requests(sim) == 61 and "; 0 requests" in res.stderr
    assert len(list((tmp_path / ".llmap").glob("districts_2023_24_nces-*.ledger.sqlite"))) == 1

    other = tmp_path / "by-hand"
    other.mkdir()
    (other / "job.toml").write_text(f'''
[input]
path = "{DISTRICTS}"
key = "district_id"
where = "state = 'WY'"

[prompt]
user = "{PROMPT}"

[output]
path = "job.csv"

[output.fields]
kind = {{ type = "string", enum = ["city", "county", "other"] }}
note = {{ type = "string" }}

[model]
provider = "openai"
name = "sim"
base_url = "{sim.base_url}"
''')
    res = runner.invoke(app, ["run", str(other / "job.toml")])
    assert res.exit_code == 0, res.output
    assert chat_requests(sim) == 61  # the same requests: answered by the response cache
    line_rows, job_rows = _rows(tmp_path / "line.csv"), _rows(other / "job.csv")
    assert len(line_rows) == 61 and line_rows == job_rows


def test_save_writes_the_equivalent_job_file_on_the_same_ledger(tmp_path, sim, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_csv(tmp_path / "people.csv", people(10))
    line = ["run", "people.csv", "--prompt", "Name: {{ name }}", "--field", "kind=enum:a,b",
            "--field", "minutes=integer?", "--model", "sim", "--base-url", sim.base_url, "--limit", "4"]
    res = runner.invoke(app, [*line, "--save", "job.toml"])
    assert res.exit_code == 0, res.output
    assert chat_requests(sim) == 4 and "saved the job as job.toml" in res.stderr
    doc = tomllib.loads((tmp_path / "job.toml").read_text())
    assert doc["input"] == {"path": "people.csv", "key": "id", "limit": 4}
    assert doc["output"]["fields"] == {"kind": {"type": "string", "enum": ["a", "b"]},
                                       "minutes": {"type": "integer", "nullable": True}}
    res = runner.invoke(app, ["run", "job.toml"])  # the same ledger: the 4 rows are done
    assert res.exit_code == 0 and chat_requests(sim) == 4, res.output
    res = runner.invoke(app, line[:-2])  # the line without --limit continues the same job
    assert res.exit_code == 0 and chat_requests(sim) == 10
    res = runner.invoke(app, [*line, "--save", "job.toml"])
    assert res.exit_code == 2 and "exists" in res.stderr


def test_the_name_changes_with_the_prompt_not_with_limit_or_output(tmp_path, sim, monkeypatch):
    from llmap.cli.oneline import oneline_job

    monkeypatch.chdir(tmp_path)
    write_csv(tmp_path / "p.csv", people(3))
    a = oneline_job(Path("p.csv"), prompt="{{ name }}", fields=["k"], limit=2, output=Path("x.csv"))
    b = oneline_job(Path("p.csv"), prompt="{{ name }}", fields=["k"])
    c = oneline_job(Path("p.csv"), prompt="{{ name }}!", fields=["k"])
    assert a.name == b.name != c.name and a.name.startswith("p-")
    assert b.doc["model"] == {"provider": "local"} and b.doc["output"]["path"] == f"out/{b.name}.csv"


@pytest.mark.parametrize("text, entry", [
    ("kind=enum:city,county,other", {"type": "string", "enum": ["city", "county", "other"]}),
    ("note=string", {"type": "string"}),
    ("note", {"type": "string"}),
    ("n=int", {"type": "integer"}),
    ("minutes=integer?", {"type": "integer", "nullable": True}),
    ("grade=integer:1,2,3", {"type": "integer", "enum": [1, 2, 3]}),
    ("share=float", {"type": "number"}),
    ("ok=bool?", {"type": "boolean", "nullable": True}),
])
def test_field_syntax(text, entry):
    assert parse_field(text)[1] == entry


@pytest.mark.parametrize("text, words", [
    ("kind=enm:a,b", "unknown type 'enm'"), ("kind=enum", "enum needs values"), ("2x=string", "not a field name"),
    ("n=integer:1,x", "'x' is not a integer"),
])
def test_bad_fields_are_one_line_errors(text, words):
    with pytest.raises(SpecError, match=words):
        parse_field(text)


def test_one_line_mistakes_exit_2_with_one_line(tmp_path, sim, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_csv(tmp_path / "people.csv", people(3))
    cases = [
        (["run", "people.csv"], "add --prompt TEMPLATE and --field NAME=TYPE, or write a job file with: llmap init"),
        (["run", "people.csv", "--prompt", "{{ name }}"], "needs at least one --field"),
        (["run", "people.csv", "--prompt", "{{ nme }}", "--field", "k"], "did you mean 'name'?"),
        (["run", "poeple.csv", "--prompt", "{{ name }}", "--field", "k"], "did you mean 'people.csv'?"),
        (["run", "people.csv", "--prompt", "x", "--field", "k=what"], "unknown type 'what'"),
        (["run", "job.toml", "--prompt", "x"], "--prompt applies to a data file"),
    ]
    (tmp_path / "job.toml").write_text("")
    for args, words in cases:
        res = runner.invoke(app, [*args, "--model", "sim", "--base-url", sim.base_url])
        assert res.exit_code == 2 and words in res.stderr, (args, res.output)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert chat_requests(sim) == 0
