"""README stays a first page (under 200 lines, the fresh-machine commands first); docs/ builds with warnings as
errors."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", README, re.S)


def test_readme_is_under_200_lines_and_opens_with_the_fresh_machine_commands():
    assert len(README.splitlines()) < 200
    blocks = _bash_blocks()
    assert blocks[0].startswith("python3 -m venv .venv")
    assert blocks[0].endswith(".venv/bin/llmap run examples/districts.toml")
    assert blocks[1].startswith("python3 -m venv .venv") and blocks[1].endswith(".venv/bin/python -m pytest")
    first_minute = [ln.split("#")[0].strip() for ln in blocks[2].splitlines()]
    assert first_minute[0].startswith("llmap init ") and "--preview 5" in first_minute[1]
    assert README.index("## The first minute") < README.index("## An example") < README.index("## Documentation")


def test_readme_and_docs_link_only_to_files_that_exist():
    for target in re.findall(r"\]\(((?:docs|examples)/[^)#]+)", README):
        assert (REPO / target).exists(), target


def test_every_docs_page_is_in_the_nav():
    config = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    pages = {p.name for p in (REPO / "docs").glob("*.md")}
    listed = set(re.findall(r":\s*([\w-]+\.md)\s*$", config, re.M))
    assert pages == listed, f"not in the nav: {sorted(pages - listed)}; missing: {sorted(listed - pages)}"
    assert "strict: true" in config


def test_ci_installs_the_docs_extra_and_builds_strict():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("mkdocs>") for d in extras["docs"]) and any("mkdocs-material" in d for d in extras["docs"])
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert "pip install --no-cache-dir -e '.[docs]'" in ci and "mkdocs build --strict" in ci
    lines = ci.splitlines()
    build = next(i for i, ln in enumerate(lines) if ln.startswith(".venv/bin/pip install") and "'.[docs]'" in ln)
    assert "mkdocs build --strict" in lines[build] and "-q" not in lines[build].split()  # -q hides the warnings
    assert any(ln.endswith(".venv/bin/python -m pytest") for ln in lines[:build])


@pytest.mark.skipif(shutil.which("mkdocs") is None and not (Path(sys.executable).parent / "mkdocs").exists(),
                    reason="needs the docs extra (pip install -e '.[docs]'); .ci/run builds the docs after the tests")
def test_the_docs_build_with_warnings_as_errors(tmp_path):
    mkdocs = Path(sys.executable).parent / "mkdocs"
    cmd = [str(mkdocs) if mkdocs.exists() else "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "site" / "getting-started" / "index.html").is_file()
