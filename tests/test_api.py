"""The public surface: llmap.map over every supported data kind, and __all__."""

from __future__ import annotations

import inspect

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
        as_rows = out.to_dict("records") if kind is pd.DataFrame else out.to_pylist() if kind is pa.Table else out.to_dicts()
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

