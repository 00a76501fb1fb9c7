""".ci/run runs README's test command; .ci/check_no_amx.py finds AMX instructions in shared libraries; ruff
finds nothing."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / ".ci" / "check_no_amx.py"

needs_toolchain = pytest.mark.skipif(not (shutil.which("cc") and shutil.which("objdump")),
                                reason="needs a C compiler and objdump (binutils)")


def _lib(tmp: Path, name: str, asm: str) -> Path:
    src = tmp / f"{name}.s"
    src.write_text(f".text\n.globl f\nf:\n{asm}\n  ret\n")
    out = tmp / f"{name}.so"
    r = subprocess.run(["cc", "-shared", "-nostdlib", "-o", str(out), str(src)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"the assembler cannot build the test library: {r.stderr.strip()[:200]}")
    return out


def _check(*args: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK), *map(str, args)], capture_output=True, text=True)


def test_ci_runs_the_readme_test_command_verbatim_then_the_amx_check():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme.split("**Run the tests on a fresh machine:**", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert block in ci
    assert "--no-cache-dir" in block and "--no-binary llama-cpp-python" in block and "-DGGML_NATIVE=OFF" in block
    assert "export LLMAP_REQUIRE_LOCAL_MODEL=1" in ci[:ci.index(block)]
    assert ".venv/bin/python .ci/check_no_amx.py" in ci[ci.index(block):]


@needs_toolchain
def test_amx_instructions_fail_the_check(tmp_path):
    amx = tmp_path / "amx"
    amx.mkdir()
    _lib(amx, "libggml-cpu", "  ldtilecfg (%rdi)\n  tileloadd (%rsi,%rdx,1), %tmm0\n  tdpbssd %tmm2, %tmm1, %tmm0\n"
                             "  tilerelease")
    r = _check(amx)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "4 AMX instructions" in r.stdout and "ldtilecfg x1" in r.stdout and "tdpbssd x1" in r.stdout


@needs_toolchain
def test_a_portable_library_passes(tmp_path):
    ok = tmp_path / "ok"
    ok.mkdir()
    _lib(ok, "libggml-cpu", "  vfmadd231ps %ymm1, %ymm2, %ymm0\n  vzeroupper")
    r = _check(ok)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK: 1 libraries, no AMX instruction" in r.stdout


@needs_toolchain
def test_no_library_fails_the_check(tmp_path):
    r = _check(tmp_path)
    assert r.returncode == 1
    assert "no shared library found" in r.stderr


def test_ruff_finds_nothing_in_the_repository():
    # CI enforces the lint rules and line length that pyproject.toml declares; ruff comes with the test extra
    if importlib.util.find_spec("ruff") is None:
        pytest.fail("ruff is not installed; install the test extra: pip install -e '.[test]'")
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_is_told_the_line_length_it_enforces():
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert config["tool"]["ruff"]["line-length"] == 120
    assert "E501" not in config["tool"]["ruff"]["lint"].get("ignore", [])
    assert any(dep.startswith("ruff") for dep in config["project"]["optional-dependencies"]["test"])
