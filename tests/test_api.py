"""The public surface: llmap.map over every supported data kind; __all__, the errors public docstrings name,
Progress and __version__."""

from __future__ import annotations

import builtins
import importlib.metadata
import inspect
import re
import subprocess
import sys

import pyarrow as pa
import pytest

import llmap
from llmap.errors import SpecError

ROWS = [{"name": f"n{i}", "city": "Cody" if i % 2 else "Casper"} for i in range(6)]
FIELDS = {"kind": {"type": "string", "enum": ["a", "b"]}, "n": "integer"}


def test_exported_members_are_sorted_and_real():
    assert llmap.__all__ == sorted(llmap.__all__)
    for name in llmap.__all__:
        assert hasattr(llmap, name), name
    public = {n for n in dir(llmap) if not n.startswith("_") and not inspect.ismodule(getattr(llmap, n))}
    assert public <= set(llmap.__all__)


def _public_docstrings() -> list[tuple[str, str]]:
    """``(where, docstring)`` of every public function, class, method and property llmap exports, and of
    ``llmap.ray.map_batches``; members that come from other libraries (pydantic's) are left out."""
    import llmap.ray

    out = []
    for where, obj in [*((f"llmap.{n}", getattr(llmap, n)) for n in llmap.__all__ if n != "__version__"),
                       ("llmap.ray.map_batches", llmap.ray.map_batches)]:
        out.append((where, inspect.getdoc(obj) or ""))
        if not inspect.isclass(obj):
            continue
        for name, member in inspect.getmembers(obj):
            fn = member.fget if isinstance(member, property) else member
            if name.startswith("_") or not getattr(fn, "__module__", "").startswith("llmap"):
                continue
            out.append((f"{where}.{name}", inspect.getdoc(fn) or ""))
    return out


def _raises(doc: str) -> list[str]:
    """The exception names in a Google-style ``Raises:`` section (``Name: when``, one indent deeper)."""
    names: list[str] = []
    section, entry = None, None  # the indents of "Raises:" and of its entries
    for line in doc.splitlines():
        text, depth = line.strip(), len(line) - len(line.lstrip())
        if section is None:
            section = depth if text == "Raises:" else None
            continue
        if not text:
            continue
        if depth <= section:
            break
        entry = depth if entry is None else entry
        if depth == entry and (m := re.match(r"([A-Za-z_][\w.]*):", text)):
            names.append(m.group(1))
    return names


def test_every_error_a_public_docstring_names_is_exported():
    docs = _public_docstrings()
    raised = {(where, name) for where, doc in docs for name in _raises(doc)}
    assert ("llmap.Job.run", "DiskFull") in raised and ("llmap.Job.run", "EventLoopRunning") in raised  # it parses
    referenced = {(where, name) for where, doc in docs for name in re.findall(r"llmap\.errors\.(\w+)", doc)}
    missing = sorted(f"{where}: {name}" for where, name in raised | referenced
                     if "." not in name and name not in llmap.__all__
                     and not isinstance(getattr(builtins, name, None), type))
    assert missing == [], "named in a public docstring but not exported from llmap"
    from llmap import errors

    assert set(errors.__all__) <= set(llmap.__all__)  # the whole tree, under LlmapError
    assert all(issubclass(getattr(llmap, n), llmap.LlmapError) for n in errors.__all__)


def test_progress_is_documented_and_a_plain_class_can_be_one(make_job):
    doc = inspect.getdoc(llmap.Progress)
    assert doc and "Job.run(progress=...)" in doc
    for method in ("start", "advance", "message", "finish"):
        assert f":meth:`{method}`" in doc and inspect.getdoc(getattr(llmap.Progress, method)), method
    assert inspect.getdoc(llmap.Tally) and "settled" in dir(llmap.Tally)

    class Reporter:  # no base class: the protocol is structural
        def __init__(self) -> None:
            self.calls: list[tuple] = []

        def start(self, tally):
            self.calls.append(("start", tally.total, tally.settled))

        def advance(self, tally):
            self.calls.append(("advance", tally.settled))

        def message(self, text):
            self.calls.append(("message", text))

        def finish(self, tally):
            self.calls.append(("finish", tally.done))

    reporter = Reporter()
    llmap.Job.from_toml(make_job(12)).run(progress=reporter)
    assert reporter.calls[0] == ("start", 12, 0) and reporter.calls[-1] == ("finish", 12)
    advances = [c[1] for c in reporter.calls if c[0] == "advance"]
    assert advances and advances == sorted(advances) and advances[-1] == 12


def test_version_comes_from_the_package_metadata():
    assert llmap.__version__ == importlib.metadata.version("llmap")
    # not installed (a bare source tree on the path): a version that says so, not an ImportError
    code = ("import importlib.metadata as m\n"
            "real = m.version\n"
            "def version(name):\n"
            "    if name == 'llmap':\n        raise m.PackageNotFoundError(name)\n"
            "    return real(name)\n"
            "m.version = version\nimport llmap\nprint(llmap.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "0+unknown", out.stderr


def _call(data, sim):
    return llmap.map(data, prompt="{{ name }} of {{ city }}", fields=FIELDS, model="sim", base_url=sim.base_url)


def test_map_list_of_dicts(sim):
    out = _call(ROWS, sim)
    assert isinstance(out, list) and len(out) == 6
    assert [r["name"] for r in out] == [r["name"] for r in ROWS]
    assert all(r["kind"] in "ab" and isinstance(r["n"], int) and r["_status"] == "done" for r in out)
    assert sim.stats()["requests"] == 6


def test_map_pandas_polars_arrow_keep_kind_and_order(sim):
    import pandas as pd
    import polars as pl

    base = _call(ROWS, sim)
    for data, kind in [(pd.DataFrame(ROWS), pd.DataFrame), (pl.DataFrame(ROWS), pl.DataFrame),
                       (pa.Table.from_pylist(ROWS), pa.Table)]:
        out = _call(data, sim)
        assert isinstance(out, kind)
        as_rows = (out.to_dict("records") if kind is pd.DataFrame else out.to_pylist() if kind is pa.Table
                   else out.to_dicts())
        assert [r["kind"] for r in as_rows] == [r["kind"] for r in base]  # same request, same answer
        assert list(as_rows[0])[:2] == ["name", "city"]


def test_map_rejects_bad_arguments(sim):
    with pytest.raises(SpecError, match="already a column"):
        llmap.map(ROWS, prompt="{{ name }}", fields={"city": "string"}, model="sim", base_url=sim.base_url)
    with pytest.raises(SpecError, match="template names column 'nope'"):
        llmap.map(ROWS, prompt="{{ nope }}", fields={"x": "string"}, model="sim", base_url=sim.base_url)
    with pytest.raises(SpecError, match="cannot read int"):
        llmap.map(3, prompt="{{ nope }}", fields={"x": "string"})


def test_map_resumes_with_a_ledger(sim, tmp_path):
    ledger = tmp_path / "m.sqlite"
    llmap.map(ROWS, prompt="{{ name }}", fields={"x": "string"}, model="sim", base_url=sim.base_url, ledger=ledger)
    out = llmap.map(ROWS, prompt="{{ name }}", fields={"x": "string"}, model="sim", base_url=sim.base_url,
                    ledger=ledger)
    assert sim.stats()["requests"] == 6 and all(r["_status"] == "done" for r in out)


def test_amap_is_public_and_async():
    assert "amap" in llmap.__all__
    assert inspect.iscoroutinefunction(llmap.amap)
    assert inspect.signature(llmap.amap).parameters.keys() == inspect.signature(llmap.map).parameters.keys()


async def test_amap_runs_inside_a_running_event_loop(sim):
    # a notebook cell: an event loop is already running in this thread
    out = await llmap.amap(ROWS, prompt="{{ name }} of {{ city }}", fields=FIELDS, model="sim", base_url=sim.base_url)
    assert [r["name"] for r in out] == [r["name"] for r in ROWS]
    assert all(r["_status"] == "done" for r in out)
    assert sim.stats()["requests"] == 6


async def test_map_inside_a_running_event_loop_says_to_await_amap(sim, make_job):
    with pytest.raises(llmap.LlmapError, match=r"await llmap\.amap\(\.\.\.\)") as info:
        llmap.map(ROWS, prompt="{{ name }}", fields=FIELDS, model="sim", base_url=sim.base_url)
    assert isinstance(info.value, RuntimeError)  # what asyncio.run raises there, too
    job = llmap.Job.from_toml(make_job(3))
    with pytest.raises(llmap.LlmapError, match=r"await job\.arun\(\.\.\.\)"):
        job.run()
    assert sim.stats()["requests"] == 0



def test_job_prepare_returns_a_public_exported_type():
    import inspect
    import typing

    hints = typing.get_type_hints(llmap.Job.prepare)
    ret = hints["return"]
    assert ret is llmap.Prepared and not ret.__name__.startswith("_")
    assert inspect.getdoc(llmap.Prepared) and hasattr(llmap.Prepared, "aclose")
