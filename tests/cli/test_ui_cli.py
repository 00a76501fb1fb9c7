"""``llmap ui`` and ``llmap run --ui`` from the command line: the URL on one line, the safe defaults, one-line
errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from _support import LLMAP, job_toml, people, write_csv
from llmap.sim import Simulator

URL = re.compile(r"^llmap ui: (http://127\.0\.0\.1:(\d+)/([A-Za-z0-9_-]{40,})/)$")


def _job(tmp_path: Path, base_url: str, n: int = 8) -> Path:
    write_csv(tmp_path / "people.csv", people(n))
    job = tmp_path / "job.toml"
    job.write_text(job_toml(base_url, concurrency=2), encoding="utf-8")
    return job


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "LLMAP_CACHE_DIR": str(tmp_path / "cache")}


def _read_url(proc: subprocess.Popen, timeout: float = 60.0) -> str:
    """The URL line of the process's output (read in a thread: a pipe read has no timeout of its own)."""
    found: list[str] = []
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            m = URL.match(line.strip())
            if m:
                found.append(m.group(1))
                return

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout)
    assert found, f"no URL line within {timeout:g} s; output: {lines!r}"
    return found[0]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_llmap_ui_prints_its_url_with_the_token_on_one_line_and_serves_until_ctrl_c(tmp_path, sim):
    job = _job(tmp_path, sim.base_url)
    subprocess.run([*LLMAP, "run", str(job), "-q"], env=_env(tmp_path), check=True, capture_output=True)
    proc = subprocess.Popen([*LLMAP, "ui", str(job), "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(tmp_path))
    try:
        url = _read_url(proc)
        status, html = _get(url)
        assert status == 200 and '<b id="count-done">8</b>' in html
        root = url.rsplit("/", 2)[0]
        assert _get(root + "/")[0] == 403 and _get(root + "/api/summary")[0] == 403
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
    assert proc.returncode == 0


def test_the_port_given_is_the_port_served(tmp_path, sim):
    job = _job(tmp_path, sim.base_url, 2)
    subprocess.run([*LLMAP, "run", str(job), "-q"], env=_env(tmp_path), check=True, capture_output=True)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*LLMAP, "ui", str(job), "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(tmp_path))
    try:
        assert f"http://127.0.0.1:{port}/" in _read_url(proc)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert proc.returncode == 0  # SIGTERM stops it like Ctrl-C


def test_another_host_needs_allow_remote_and_says_what_it_exposes(tmp_path, sim):
    job = _job(tmp_path, sim.base_url, 2)
    subprocess.run([*LLMAP, "run", str(job), "-q"], env=_env(tmp_path), check=True, capture_output=True)
    r = subprocess.run([*LLMAP, "ui", str(job), "--host", "0.0.0.0"], capture_output=True, text=True,
                       env={**_env(tmp_path), "COLUMNS": "400"}, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "--allow-remote" in err and "anyone who has its URL" in err


def test_a_job_never_run_is_a_one_line_error(tmp_path, sim):
    job = _job(tmp_path, sim.base_url, 2)
    r = subprocess.run([*LLMAP, "ui", str(job)], capture_output=True, text=True, env={**_env(tmp_path),
                                                                                     "COLUMNS": "400"}, timeout=60)
    assert r.returncode == 2 and "run `llmap run` on it first" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_run_with_ui_serves_the_live_page_while_the_run_lasts(tmp_path):
    with Simulator(latency_median=0.25) as sim:
        job = _job(tmp_path, sim.base_url, 24)
        proc = subprocess.Popen([*LLMAP, "run", str(job), "-q", "--ui"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=_env(tmp_path))
        try:
            url = _read_url(proc)
            deadline = time.monotonic() + 30
            while True:  # the run's own counters reach the page, beside the ledger's
                summary = json.loads(_get(url + "api/summary")[1])
                if summary.get("in_process") and summary["in_process"].get("requests"):
                    break
                assert time.monotonic() < deadline, f"no live counters from the run: {summary}"
                time.sleep(0.05)
            assert summary["run"]["running"] and summary["in_process"]["models"][0]["model"] == "openai:sim"
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
        assert "done" in proc.stderr.read()
