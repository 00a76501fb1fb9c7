"""The layout: no import cycle (lazy imports included), no private name imported across modules,
every module imports on its own, and modules stay small."""

from __future__ import annotations

import ast
import pkgutil
import re
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import llmap

SRC = Path(llmap.__file__).parent

#: Modules over ~500 lines, each with the reason docs/architecture.md gives.
LONG_MODULES: set[str] = set()


def _modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages([str(SRC)], prefix="llmap.")]
    return sorted(n for n in names if not n.endswith(".__main__"))  # entry points run the CLI when imported


# --- static analysis of imports ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Edge:
    """One import statement of ``source`` that loads module ``target`` (``lazy``: inside a function)."""

    source: str
    target: str
    line: int
    lazy: bool

    def __str__(self) -> str:
        return f"{self.source}:{self.line} -> {self.target}{' (lazy)' if self.lazy else ''}"


def module_files(root: Path) -> dict[str, Path]:
    """Every module of the package at ``root``, by dotted name (a package by its ``__init__.py``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _statements(tree: ast.AST):
    """``(node, lazy)`` for every node that runs when the module is imported or one of its functions is called.

    The body of ``if TYPE_CHECKING:`` never runs (its ``else:`` does); a node inside a function or lambda is lazy.
    """
    todo = [(tree, False)]
    while todo:
        node, lazy = todo.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                todo.extend((c, lazy) for c in child.orelse)
                continue
            yield child, lazy
            todo.append((child, lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)))


def _absolute(name: str, files: dict[str, Path], node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = name.split(".") if files[name].name == "__init__.py" else name.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _bindings(name: str, files: dict[str, Path]):
    """``(node, lazy, bound, module, imported)`` per imported name of module ``name``, within its package.

    ``bound`` is the local name, ``module`` the module the statement loads: for ``from pkg import x`` that is
    ``pkg.x`` when it is a module, else ``pkg`` (and ``imported`` is ``x``, else None).
    """
    package = next(iter(files)).split(".")[0]
    tree = ast.parse(files[name].read_text(encoding="utf-8"), str(files[name]))
    for node, lazy in _statements(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == package:
                    bound = alias.asname or alias.name.split(".")[0]
                    yield node, lazy, bound, alias.name if alias.asname else bound, alias.name
        elif isinstance(node, ast.ImportFrom):
            pkg = _absolute(name, files, node)
            if pkg.split(".")[0] != package:
                continue
            for alias in node.names:
                sub = f"{pkg}.{alias.name}"
                yield node, lazy, alias.asname or alias.name, sub if sub in files else pkg, \
                    None if sub in files else alias.name


def import_graph(root: Path) -> dict[str, list[Edge]]:
    """Every import edge between the package's own modules, lazy imports included.

    ``import a.b.c`` loads ``a.b.c``; ``from a.b import c`` loads ``a.b.c`` when that is a module, else ``a.b``.
    (The parent packages Python initialises on the way are not edges: their ``__init__`` runs first.)
    """
    files = module_files(root)
    graph: dict[str, list[Edge]] = {name: [] for name in files}
    for name in files:
        for node, lazy, _bound, module, imported in _bindings(name, files):
            target = module if isinstance(node, ast.ImportFrom) else (imported or module)
            if target in files and target != name:
                graph[name].append(Edge(name, target, node.lineno, lazy))
    return graph


def find_cycles(graph: dict[str, list[Edge]]) -> list[list[Edge]]:
    """One cycle per strongly connected component of more than one module, as the edges that close it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for edge in graph.get(v, []):
            w = edge.target
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    cycles = []
    for component in components:
        start = min(component)
        # the shortest way back to start, staying inside the component
        back: dict[str, Edge | None] = {start: None}
        queue = deque([start])
        closing = None
        while queue and closing is None:
            v = queue.popleft()
            for edge in graph[v]:
                if edge.target == start:
                    closing = edge
                    break
                if edge.target in component and edge.target not in back:
                    back[edge.target] = edge
                    queue.append(edge.target)
        path = [closing]
        while (edge := back[path[-1].source]) is not None:
            path.append(edge)
        cycles.append(path[::-1])
    return sorted(cycles, key=lambda c: c[0].source)


def private_imports(root: Path) -> list[str]:
    """Underscored names one module takes from another module of the package.

    ``from a.b import _x``, ``import a.b as m`` then ``m._x``, and ``from a import b`` then ``b._x``;
    dunders (``__version__``) are public.
    """
    files = module_files(root)
    found = []

    def private(attr: str) -> bool:
        return attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__"))

    for name in files:
        modules: dict[str, str] = {}  # local name -> the module it is bound to
        for node, _lazy, bound, module, imported in _bindings(name, files):
            if isinstance(node, ast.ImportFrom):
                if imported is None:
                    modules[bound] = module
                elif private(imported) and module != name:
                    found.append(f"{name}:{node.lineno} imports {module}.{imported}")
            else:
                modules[bound] = module
        if not modules:
            continue
        tree = ast.parse(files[name].read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and private(node.attr)):
                continue
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if not (isinstance(value, ast.Name) and value.id in modules):
                continue
            dotted = ".".join([modules[value.id], *reversed(chain)])
            if dotted in files and dotted != name:
                found.append(f"{name}:{node.lineno} reads {dotted}.{node.attr}")
    return sorted(set(found))


def test_no_import_cycle_lazy_imports_included():
    graph = import_graph(SRC)
    assert len(graph) > 50 and any(e.lazy for edges in graph.values() for e in edges)
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(
        " ; ".join(map(str, cycle)) + f"  [modules: {', '.join(sorted({e.source for e in cycle}))}]"
        for cycle in cycles)


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "cyc"
    for rel, text in {"__init__.py": "", **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_the_cycle_check_sees_a_cycle_made_only_of_lazy_imports(tmp_path):
    root = _package(tmp_path, {
        "a.py": "def f():\n    from cyc.b import g\n    return g()\n",
        "sub/__init__.py": "",
        "sub/b.py": "def g():\n    from .. import a\n    return a\n",
        "b.py": "async def g():\n    import cyc.sub.b as m\n    return m\n",
        "sub/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cyc.sub import d\n",
        "sub/d.py": "from cyc.sub.c import X\n",
    })
    cycles = find_cycles(import_graph(root))
    assert [[str(e) for e in cycle] for cycle in cycles] == [[
        "cyc.a:2 -> cyc.b (lazy)", "cyc.b:2 -> cyc.sub.b (lazy)", "cyc.sub.b:2 -> cyc.a (lazy)"]]
    # without the lazy import in a, nothing is left: the TYPE_CHECKING import of c -> d does not run
    (root / "a.py").write_text("def f():\n    return 1\n")
    assert find_cycles(import_graph(root)) == []


def test_no_module_imports_another_modules_private_names():
    found = private_imports(SRC)
    assert not found, "private names used across modules (make them public or move them):\n" + "\n".join(found)


def test_the_private_name_check_sees_each_form(tmp_path):
    root = _package(tmp_path, {
        "a.py": "_x = 1\n__version__ = '1'\ndef _f():\n    return _x\n",
        "b.py": "from cyc.a import _x, __version__\n",
        "c.py": "import cyc.a as m\nY = m._f()\n",
        "d.py": "from cyc import a\ndef g():\n    return a._x + a.__version__\n",
        "e.py": "from . import a\nclass K:\n    _own = 1\nZ = K._own\n",
    })
    assert private_imports(root) == ["cyc.b:1 imports cyc.a._x", "cyc.c:2 reads cyc.a._f", "cyc.d:3 reads cyc.a._x"]


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
    assert long <= LONG_MODULES, (f"over 500 lines: {sorted(long - LONG_MODULES)}; split them or say why in "
                                  "docs/architecture.md")


def test_the_architecture_page_lists_exactly_the_modules():
    page = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text(encoding="utf-8")
    listed = set()
    for line in page.splitlines():
        if line.startswith("| `"):
            listed |= set(re.findall(r"`([\w/]+\.py)`", line.split("|")[1]))
    tree = {str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    assert listed == tree, (f"missing from docs/architecture.md: {sorted(tree - listed)}; "
                            f"not in the tree: {sorted(listed - tree)}")
