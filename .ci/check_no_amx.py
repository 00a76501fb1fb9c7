#!/usr/bin/env python3
"""Prove the installed llama.cpp libraries hold no AMX instructions.

A llama.cpp built with native flags on an Intel CPU with AMX uses AMX tile
instructions (``ldtilecfg``, ``tileloadd``, ``tdpbssd``, ...); that build
crashes with SIGSEGV/SIGILL on CPUs without AMX. This check disassembles
every shared library llama-cpp-python installed (``objdump -d``) and fails
when any AMX instruction is present, or when no library is found, so the
portable build is checked on any CPU.

    .venv/bin/python .ci/check_no_amx.py            # the llama_cpp package this Python imports
    python3 .ci/check_no_amx.py DIR_OR_LIB [...]    # these libraries

Exit codes: 0 no AMX instruction in any library; 1 AMX found, no library
found, or objdump missing.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

# Every AMX mnemonic: tile configuration, loads and stores, and the dot products (tdp*, tcmm*).
AMX = re.compile(r"^(ldtilecfg|sttilecfg|tilerelease|tilezero|tileload\w*|tilestore\w*|tdp\w+|tcmm\w+)\b")
INSN = re.compile(r"^\s*[0-9a-f]+:\s+(\S+)")


def libraries(args: list[str]) -> list[Path]:
    """Shared libraries under the given paths, or under the installed ``llama_cpp`` package.

    Copies with the same content (a wheel stores ``libx.so``, ``libx.so.0`` and
    ``libx.so.0.1`` as three files) are listed once.
    """
    if not args:
        import importlib.util

        spec = importlib.util.find_spec("llama_cpp")
        if spec is None or spec.origin is None:
            return []
        args = [str(Path(spec.origin).parent)]
    found: list[Path] = []
    for arg in args:
        p = Path(arg)
        candidates = [p] if p.is_file() else sorted(p.rglob("*.so*")) + sorted(p.rglob("*.dylib"))
        found += [c for c in candidates if c.is_file() and not c.is_symlink()]
    unique: dict[str, Path] = {}
    for lib in found:
        unique.setdefault(hashlib.sha256(lib.read_bytes()).hexdigest(), lib)
    return list(unique.values())


def amx_instructions(lib: Path) -> dict[str, int]:
    """Count the AMX mnemonics in ``objdump -d`` of ``lib``."""
    counts: dict[str, int] = {}
    proc = subprocess.Popen(["objdump", "-d", "--no-show-raw-insn", str(lib)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, errors="replace")
    assert proc.stdout is not None
    for line in proc.stdout:
        m = INSN.match(line)
        if m and AMX.match(m.group(1)):
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    if proc.wait() != 0:
        raise RuntimeError(f"objdump -d {lib} failed")
    return counts


def main(argv: list[str]) -> int:
    if shutil.which("objdump") is None:
        print("check_no_amx: objdump not found; install binutils", file=sys.stderr)
        return 1
    libs = libraries(argv)
    if not libs:
        where = " ".join(argv) or "the installed llama_cpp package"
        print(f"check_no_amx: no shared library found in {where}; is llama-cpp-python installed?",
              file=sys.stderr)
        return 1
    bad = 0
    for lib in libs:
        counts = amx_instructions(lib)
        total = sum(counts.values())
        bad += total
        detail = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) if counts else "no AMX"
        print(f"check_no_amx: {lib}: {total} AMX instructions ({detail})")
    if bad:
        print(f"check_no_amx: FAIL: {bad} AMX instructions; rebuild llama-cpp-python without native flags "
              "(see README: 'Run the tests on a fresh machine')", file=sys.stderr)
        return 1
    print(f"check_no_amx: OK: {len(libs)} libraries, no AMX instruction")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
