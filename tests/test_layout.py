"""The layout: every module imports on its own (no import cycles), and modules stay small."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import llmap

SRC = Path(llmap.__file__).parent

#: Modules over ~500 lines, each with the reason docs/architecture.md gives.
LONG_MODULES: set[str] = set()


def _modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages([str(SRC)], prefix="llmap.")]
    return sorted(n for n in names if not n.endswith(".__main__"))  # entry points run the CLI when imported


# Each module is imported as the first llmap module of a fresh state: every llmap module is
# dropped from sys.modules before the next import, so a cycle cannot hide behind import order.
_PROBE = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for m in [m for m in sys.modules if m == "llmap" or m.startswith("llmap.")]:
        del sys.modules[m]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc().strip().splitlines()[-1])
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_alone():
    modules = _modules()
    assert len(modules) > 50 and "llmap.run.dispatch" in modules and "llmap.plan" in modules
    out = subprocess.run([sys.executable, "-c", _PROBE, *modules], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_probe_catches_a_cycle(tmp_path):
    pkg = tmp_path / "cyc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cyc.b import B\nA = 1\n")
    (pkg / "b.py").write_text("from cyc.a import A\nB = 1\n")
    probe = _PROBE.replace('"llmap"', '"cyc"').replace('"llmap."', '"cyc."')
    out = subprocess.run([sys.executable, "-c", probe, "cyc.a"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=60)
    assert out.returncode == 1 and "cyc.a" in out.stdout


def test_no_module_is_over_500_lines_without_a_reason():
    long = {name for name in _modules()
            if (path := SRC.joinpath(*name.split(".")[1:]).with_suffix(".py")).is_file()
            and len(path.read_text(encoding="utf-8").splitlines()) > 500}
    assert long <= LONG_MODULES, f"over 500 lines: {sorted(long - LONG_MODULES)}; split them or say why in docs/architecture.md"


def test_the_architecture_page_lists_exactly_the_modules():
    page = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text(encoding="utf-8")
    import re

    listed = set()
    for line in page.splitlines():
        if line.startswith("| `"):
            listed |= set(re.findall(r"`([\w/]+\.py)`", line.split("|")[1]))
    tree = {str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    assert listed == tree, (f"missing from docs/architecture.md: {sorted(tree - listed)}; "
                            f"not in the tree: {sorted(listed - tree)}")
