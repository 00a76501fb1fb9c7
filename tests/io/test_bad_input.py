"""Every bad input gets a one-line error naming the fix, exit code 2, and no request sent."""

from __future__ import annotations

import codecs

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
        dict(prompt_extra='examples = [{ input = { name = "x", city = "y", zzz = 1 }, '
                          'output = { kind = "a", score = 0.5 } }]'),
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


def test_missing_job_file_names_the_folder_it_looked_in(tmp_path):
    (tmp_path / "jobs.toml").write_text("")
    code, out = _run(tmp_path / "job.toml")
    assert code == 2 and f"job file 'job.toml' not found in folder '{tmp_path}'" in out
    assert "did you mean 'jobs.toml'?" in out and len(out.strip().splitlines()) == 1


def test_missing_input_file_names_the_folder_it_looked_in(make_job, sim, tmp_path):
    job = make_job(3, input_path="data/peopel.csv")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "people.csv").write_text((tmp_path / "people.csv").read_text())
    code, out = _run(job)
    assert code == 2 and f"input file 'peopel.csv' not found in folder '{tmp_path / 'data'}'" in out, out
    assert "did you mean 'people.csv'?" in out and chat_requests(sim) == 0


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


# -- odd files: the real problem, its line and the fix; never a misleading column list ----------------------

def _rows_csv(n: int, *, bad_at: int | None = None, bad: str = "") -> str:
    lines = ["id,name,city"] + [f"p{i:04d},Person {i},Cody" for i in range(n)]
    if bad_at is not None:
        lines[bad_at - 1] = bad  # bad_at is a 1-based file line
    return "\n".join(lines) + "\n"


def _typed_csv(n: int, flip_at: int) -> str:
    lines = ["id,name,age"] + [f"p{i:04d},Person {i},{20 + i % 50}" for i in range(n)]
    lines[flip_at - 1] = f"p{flip_at - 2:04d},Person x,unknown"
    return "\n".join(lines) + "\n"


FILES = {
    # name: (file name, content (str is written as UTF-8), job changes, expected text, text that must not appear)
    "ragged second line": ("people.csv", _rows_csv(3, bad_at=2, bad="p0000,Ann,Cody,extra"), {},
                           "line 2 has 4 fields but the header (line 1) has 3", "input columns"),
    "ragged line deep in the file": ("people.csv", _rows_csv(30_000, bad_at=25_002, bad="p9,Ann,Cody,extra"), {},
                                     "line 25002 has 4 fields but the header has 3", "input columns"),
    "empty file": ("people.csv", "", {}, "is empty (0 bytes)", "column0"),
    "blank file": ("people.csv", "\n \n\n", {}, "is empty (4 bytes, all white space)", "column0"),
    "latin-1 without encoding": ("people.csv", "id,name,city\np0,José,Cody\n".encode("latin-1"), {},
                                 "is not UTF-8: line 2 holds bytes that are not valid UTF-8; set [input] encoding",
                                 "CSV Error"),
    "windows-1252 read as latin-1": ("people.csv", "id,name,city\np0,€uro,Cody\n".encode("cp1252"),
                                     dict(extra_input='encoding = "latin-1"'), 'set [input] encoding = "cp1252"',
                                     "CSV Error"),
    "not valid in the encoding": ("people.csv", b"id,name,city\np0,Ann,Cody\np1,\x81,Cody\n",
                                  dict(extra_input='encoding = "cp1252"'), "is not valid cp1252: line 3", ""),
    "unknown encoding": ("people.csv", _rows_csv(2), dict(extra_input='encoding = "klingon"'),
                         "encoding 'klingon' is not one Python knows", ""),
    "encoding on parquet": ("people.parquet", None, dict(extra_input='encoding = "latin-1"'),
                            "[input] encoding applies to CSV and JSON files", ""),
    "broken JSONL line": ("people.jsonl", '{"id": "a", "name": "A", "city": "C"}\n{"id": "b", "name": \n'
                          '{"id": "c", "name": "C", "city": "C"}\n', {}, "line 2 is not valid JSON", "byte"),
    "JSONL line that is not an object": ("people.jsonl", '{"id": "a", "name": "A", "city": "C"}\n[1, 2]\n', {},
                                         "line 2 is not a JSON object (an array, not an object)", "input columns"),
    "not Parquet": ("people.parquet", b"this is a CSV file, renamed", {}, "is not a Parquet file", "magic"),
    "a folder": ("people.csv", "DIR", {}, "is a folder, not a file", "does not exist"),
    "a value the sniffed type cannot hold": ("people.csv", _typed_csv(25_000, flip_at=24_000),
                                             dict(user="{{ name }} is {{ age }}"),
                                             "line 24000: column 'age' holds 'unknown', but DuckDB typed the column "
                                             "BIGINT", "Conversion Error"),
}


@pytest.mark.parametrize("case", list(FILES))
def test_odd_input_files_name_the_real_problem(case, make_job, sim, tmp_path):
    name, content, changes, expected, absent = FILES[case]
    job = make_job(3, input_path=name, **changes)
    target = tmp_path / name
    if content == "DIR":
        target.unlink(missing_ok=True)
        target.mkdir()
    elif content is None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": ["a"], "name": ["A"], "city": ["C"]}), target)
    else:
        target.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    code, text = _run(job)
    assert code == 2, text
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("llmap: error:"), text
    assert expected in text, text
    assert not absent or absent not in text, text
    assert chat_requests(sim) == 0


ODD_BUT_FINE = {
    # name: (file name, bytes, [input] encoding or None, the names the output must hold)
    "UTF-8 with a BOM": ("people.csv", "\ufeffid,name,city\np0,José,Cody\np1,Zoë,Cody\n".encode(), None,
                         ["José", "Zoë"]),
    "latin-1 (DuckDB decodes it)": ("people.csv", "id,name,city\np0,José,Cody\np1,Renée,Cody\n".encode("latin-1"),
                                    "latin-1", ["José", "Renée"]),
    "Windows-1252 (a UTF-8 copy)": ("people.csv", "id,name,city\np0,€uro “q”,Cody\np1,Zoë,Cody\n".encode("cp1252"),
                                    "cp1252", ["€uro “q”", "Zoë"]),
    "UTF-16 big-endian with a BOM": ("people.csv", codecs.BOM_UTF16_BE + "id,name,city\np0,José,Cody\np1,Zoë,Cody\n"
                                     .encode("utf-16-be"), "utf-16", ["José", "Zoë"]),
    "latin-1 JSONL": ("people.jsonl", '{"id": "p0", "name": "José", "city": "C"}\n'.encode("latin-1"), "latin1",
                      ["José"]),
}


@pytest.mark.parametrize("case", list(ODD_BUT_FINE))
def test_encodings_and_bom_are_read_right(case, make_job, sim, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    name, content, encoding, names = ODD_BUT_FINE[case]
    job = make_job(1, input_path=name, extra_input=f'encoding = "{encoding}"' if encoding else "")
    (tmp_path / name).write_bytes(content)
    code, text = _run(job)
    assert code == 0, text
    out = pq.read_table(tmp_path / "out" / "result.parquet").to_pylist()
    assert [r["name"] for r in out] == names and [r["id"] for r in out] == [f"p{i}" for i in range(len(names))]
    assert chat_requests(sim) == len(names)
    assert not any((tmp_path / "tmp").iterdir())  # the UTF-8 copy is gone
