"""``llmap init DATA``: a commented job file that runs as written."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from _support import LLMAP, SHARED_DATA, chat_requests, people, write_csv
from llmap import Job
from llmap.cli import app

REPO = Path(__file__).resolve().parents[2]
BELLS = SHARED_DATA / "bell_schedules_2024_25.csv"
DISTRICTS = SHARED_DATA / "districts_2023_24_nces.csv"
needs_data = pytest.mark.skipif(not BELLS.is_file(), reason="needs ../shared/data beside the repository")

runner = CliRunner()


def _init(tmp_path: Path, data: Path, *args: str) -> tuple[int, str, Path]:
    job = tmp_path / "job.toml"
    res = runner.invoke(app, ["init", str(data), "--output", str(job), *args])
    return res.exit_code, (res.stderr or "") + (res.stdout or ""), job


def test_init_writes_a_job_that_loads_with_the_embedded_model(tmp_path):
    write_csv(tmp_path / "people.csv", people(12))
    code, text, job = _init(tmp_path, tmp_path / "people.csv")
    assert code == 0, text
    doc = tomllib.loads(job.read_text())
    assert doc["input"] == {"path": "people.csv", "key": "id"}
    assert doc["model"]["provider"] == "local" and doc["model"]["name"] == "gemma-3-270m"
    assert "{{ name }}" in doc["prompt"]["user"] and "{{ city }}" in doc["prompt"]["user"]
    assert "{{ id }}" not in doc["prompt"]["user"]  # the key identifies; it does not describe
    assert list(doc["output"]["fields"]) == ["summary"]
    spec = Job.from_toml(job).spec
    assert spec.model.label == "local:gemma-3-270m" and spec.input.key == "id"
    assert f"wrote: {job}" in text and "llmap run" in text and "--preview 5" in text
    written = job.read_text()
    assert "guessed: 'id' is unique" in written and "# examples = [" in written


def test_init_runs_as_written_against_a_server(tmp_path, sim):
    write_csv(tmp_path / "people.csv", people(8))
    code, text, job = _init(tmp_path, tmp_path / "people.csv", "--model", "sim", "--base-url", sim.base_url)
    assert code == 0, text
    doc = tomllib.loads(job.read_text())
    assert doc["model"] == {"provider": "openai", "name": "sim", "base_url": sim.base_url, "temperature": 0,
                            "max_tokens": 128}
    res = runner.invoke(app, ["run", str(job)])
    assert res.exit_code == 0, res.output
    assert chat_requests(sim) == 8 and (tmp_path / "out" / "people.csv").is_file()


def test_init_guesses_no_key_when_nothing_is_unique_and_id_like(tmp_path):
    rows = [{"name": f"n{i % 3}", "text": f"row {i}"} for i in range(9)]
    write_csv(tmp_path / "t.csv", rows)
    code, text, job = _init(tmp_path, tmp_path / "t.csv")
    assert code == 0, text
    doc = tomllib.loads(job.read_text())
    assert "key" not in doc["input"] and "keyed by their row number" in job.read_text()


def test_init_refuses_to_overwrite_and_names_a_missing_file(tmp_path):
    write_csv(tmp_path / "people.csv", people(3))
    assert _init(tmp_path, tmp_path / "people.csv")[0] == 0
    code, text, _ = _init(tmp_path, tmp_path / "people.csv")
    assert code == 2 and "exists" in text and "--force" in text
    assert _init(tmp_path, tmp_path / "people.csv", "--force")[0] == 0
    code, text, _ = _init(tmp_path, tmp_path / "poeple.csv", "--force")
    assert code == 2 and f"not found in folder '{tmp_path}'" in text and "did you mean 'people.csv'?" in text


def test_init_with_a_hosted_model_names_its_key_variable(tmp_path):
    write_csv(tmp_path / "people.csv", people(3))
    code, _, job = _init(tmp_path, tmp_path / "people.csv", "--model", "gpt-4o-mini")
    assert code == 0
    assert tomllib.loads(job.read_text())["model"]["api_key_env"] == "OPENAI_API_KEY"
    code, _, job = _init(tmp_path, tmp_path / "people.csv", "--model", "claude-haiku-4-5", "--force")
    assert tomllib.loads(job.read_text())["model"]["provider"] == "anthropic"


@needs_data
def test_init_guesses_a_composite_key_for_the_bell_schedules(tmp_path):
    code, text, job = _init(tmp_path, BELLS)
    assert code == 0, text
    doc = tomllib.loads(job.read_text())
    assert doc["input"]["key"] == ["district_id", "grade_level"]
    assert doc["input"]["path"] == os.path.relpath(BELLS, tmp_path)
    assert "{{ notes }}" in doc["prompt"]["user"] and "{{ district_name }}" in doc["prompt"]["user"]
    Job.from_toml(job)  # loads and checks


def _readme_first_minute() -> list[str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    return [ln.split("#")[0].strip() for ln in blocks[2].splitlines() if ln.strip().startswith("llmap ")]


def test_readme_opens_its_usage_with_the_three_first_minute_commands():
    cmds = _readme_first_minute()
    assert cmds[0] == "llmap init ../shared/data/bell_schedules_2024_25.csv"
    assert any(c.startswith("llmap run ../shared/data/") and "--prompt" in c and "--field" in c for c in cmds)
    assert "llmap run job.toml --preview 5" in cmds and "llmap run job.toml" in cmds


@needs_data
@pytest.mark.local_model
@pytest.mark.timeout(1500)
def test_readme_init_then_run_works_offline_with_the_embedded_model(tmp_path):
    pytest.importorskip("llama_cpp")
    repo = tmp_path / "llmap"
    repo.mkdir()
    (tmp_path / "shared").symlink_to(SHARED_DATA.parent, target_is_directory=True)
    cmds = [c for c in _readme_first_minute() if c.startswith("llmap init") or c == "llmap run job.toml"]
    assert len(cmds) == 2
    for cmd in cmds:
        argv = LLMAP + shlex.split(cmd)[1:]
        r = subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=1400,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert r.returncode == 0, f"{cmd}: {r.stdout}\n{r.stderr}"
    out = repo / "out" / "bell_schedules_2024_25.csv"
    assert out.is_file() and "81 done, 0 failed" in r.stderr
