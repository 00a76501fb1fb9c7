"""Every bad input gets a one-line error naming the fix, exit code 2, and no request sent."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from _support import chat_requests
from llmap.cli import app
from llmap.sim import Simulator

runner = CliRunner()


def _run(job_path):
    res = runner.invoke(app, ["run", str(job_path)])
    text = (res.stderr or "") + (res.stdout or "")
    return res.exit_code, text


CASES = {
    "unknown key": (dict(extra_input='pathh = "x.csv"'), "unknown key 'pathh' in [input]"),
    "key column missing": (dict(), "[input] key names column 'idd'"),
    "template column missing": (dict(user="Name: {{ nme }}"), "[prompt] template names column 'nme'"),
    "where column missing": (dict(extra_input="where = \"cty = 'Cody'\""), "[input] where"),
    "keep column missing": (dict(keep='["nam"]'), "[output] keep names column 'nam'"),
    "example column missing": (
        dict(prompt_extra='examples = [{ input = { name = "x", city = "y", zzz = 1 }, output = { kind = "a", score = 0.5 } }]'),
        "[prompt] examples #1 names column 'zzz'"),
    "example output invalid": (
        dict(prompt_extra='examples = [{ input = { name = "x", city = "y" }, output = { kind = "q", score = 0.5 } }]'),
        "examples #1: output does not match"),
    "template syntax error": (dict(user="Name: {{ name "), "template syntax error"),
    "unreadable input": (dict(input_path="nope.csv"), "input file"),
    "unwritable output": (dict(output="people.csv/out.parquet"), "cannot write output"),
    "missing api key variable": (dict(model_extra='api_key_env = "LLMAP_TEST_SURELY_UNSET"'),
                                 "environment variable LLMAP_TEST_SURELY_UNSET is not set"),
    "unknown field type": (dict(fields='n = { type = "float" }'), "unknown field type 'float'"),
    "unknown output format": (dict(output="out/r.xlsx"), "must end in .parquet, .jsonl or .csv"),
    "bad base url": (dict(base_url="http://127.0.0.1:9/v1"), "cannot reach [model] base_url"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line_and_sends_nothing(case, make_job, sim, monkeypatch):
    monkeypatch.delenv("LLMAP_TEST_SURELY_UNSET", raising=False)
    kw, expected = CASES[case]
    job = make_job(5, **kw)
    if case == "key column missing":
        job.write_text(job.read_text().replace('key = "id"', 'key = "idd"'))
    code, text = _run(job)
    assert code == 2, text
    assert expected in text, text
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("llmap: error:"), text
    assert chat_requests(sim) == 0


def test_duplicate_key_names_the_first_duplicate(make_job, sim, tmp_path):
    job = make_job(5)
    text = (tmp_path / "people.csv").read_text().replace("p0003", "p0001")
    (tmp_path / "people.csv").write_text(text)
    code, out = _run(job)
    assert code == 2 and "'p0001' appears 2 times" in out and chat_requests(sim) == 0


def test_corrupt_parquet_is_an_input_error(make_job, sim, tmp_path):
    (tmp_path / "people.parquet").write_bytes(b"PAR1 this is not parquet")
    job = make_job(5, input_path="people.parquet")
    code, out = _run(job)
    assert code == 2 and "cannot read input" in out and chat_requests(sim) == 0


def test_invalid_toml(tmp_path):
    job = tmp_path / "j.toml"
    job.write_text("[input\npath = 1")
    code, out = _run(job)
    assert code == 2 and "not valid TOML" in out


def test_missing_job_file(tmp_path):
    code, out = _run(tmp_path / "nope.toml")
    assert code == 2 and "does not exist" in out


def test_rejected_api_key(make_job, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMAP_TEST_KEY", "wrong")
    with Simulator(require_key="right") as locked:
        job = make_job(3, base_url=locked.base_url, model_extra='api_key_env = "LLMAP_TEST_KEY"')
        code, out = _run(job)
        assert code == 2 and "rejected the key in $LLMAP_TEST_KEY (HTTP 401)" in out
        assert chat_requests(locked) == 0
        monkeypatch.setenv("LLMAP_TEST_KEY", "right")
        code, out = _run(job)
        assert code == 0 and chat_requests(locked) == 3


@pytest.mark.parametrize("prices, missing", [("", "price_in or price_out"), ("price_in = 0.15", "price_out")])
def test_cost_cap_without_prices_is_a_bad_job(make_job, sim, prices, missing):
    job = make_job(5, model_extra=prices)
    job.write_text(job.read_text().replace("concurrency = 4", "concurrency = 4\nmax_cost_usd = 5.0"))
    code, text = _run(job)
    assert code == 2, text
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("llmap: error:"), text
    assert f"[[model]] 'sim' has no {missing}" in text and "add price_in and price_out" in text
    assert chat_requests(sim) == 0


def test_cost_cap_with_explicit_zero_prices_runs(make_job, sim):
    job = make_job(3, model_extra="price_in = 0\nprice_out = 0")  # a free server, said so explicitly
    job.write_text(job.read_text().replace("concurrency = 4", "concurrency = 4\nmax_cost_usd = 5.0"))
    code, text = _run(job)
    assert code == 0, text
    assert chat_requests(sim) == 3
