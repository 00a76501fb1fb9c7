"""Choosing an executor: checked before anything is sent; ``import llmap`` never imports Ray."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from _support import LLMAP
from llmap import Job, SpecError


def test_import_llmap_and_a_local_run_never_import_ray():
    code = ("import sys, llmap, llmap.engine, llmap.cli, llmap.run.pool, llmap.run.ray.executor, llmap.run.ray.launch, "
            "llmap.ray; print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize(("kw", "message"), [
    ({"executor": "spark"}, "unknown executor 'spark'"),
    ({"workers": 2}, "--workers applies to --executor ray only"),
    ({"executor": "ray", "workers": 0}, "--workers must be at least 1"),
])
def test_bad_executor_arguments_are_one_line_errors_before_any_request(make_job, sim, kw, message):
    job = Job.from_toml(make_job(5))
    with pytest.raises(SpecError, match=message):
        job.run(**kw)
    assert sim.stats()["requests"] == 0


def test_without_ray_the_error_says_how_to_install_it(make_job, sim, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    job = Job.from_toml(make_job(5))
    with pytest.raises(SpecError, match=r"pip install 'llmap\[ray\]'"):
        job.run(executor="ray")
    assert sim.stats()["requests"] == 0


def test_run_help_teaches_the_ray_options():
    out = subprocess.run([*LLMAP, "run", "--help"], capture_output=True, text=True, timeout=60,
                         env={"COLUMNS": "200", "PATH": ""})
    assert "--executor" in out.stdout and "--ray-address" in out.stdout and "--workers" in out.stdout


def test_ray_with_the_batch_api_is_a_one_line_error_before_any_request(make_job, sim):
    job = Job.from_toml(make_job(5, model_extra="batch = true"))
    with pytest.raises(SpecError, match=r"\[model\] batch .* drop --executor ray"):
        job.run(executor="ray")
    assert sim.stats()["requests"] == 0


def _launch_with(results, monkeypatch):
    """A Launch whose workers' setup ended with ``results`` (one per worker), without a cluster; ``setups()``
    makes the setup futures (inside a running loop), all ended, so the executor sees every outcome at once."""
    ray = pytest.importorskip("ray")
    from llmap.run.ray import launch as ray_run

    launch = object.__new__(ray_run.Launch)
    launch.handles = {f"w{i}": object() for i in range(len(results))}
    launch.budget = launch.cache = None

    def setups():
        futures = {}
        for name, r in zip(launch.handles, results, strict=True):
            futures[name] = asyncio.get_running_loop().create_future()
            if isinstance(r, BaseException):
                futures[name].set_exception(r)
            else:
                futures[name].set_result(r)
        return futures

    killed = []
    monkeypatch.setattr(ray, "kill", killed.append)
    monkeypatch.setattr(ray_run, "RayExecutor", lambda handles, *a, **kw: handles)
    return launch, setups, killed


def test_a_worker_that_cannot_start_is_dropped_and_the_others_go_on(monkeypatch):
    import ray.exceptions

    launch, setups, killed = _launch_with([None, ray.exceptions.RayActorError(), None], monkeypatch)
    lost = launch.handles["w1"]

    async def scenario():
        launch._setups = setups()
        return await launch.executor(None, None)

    workers = asyncio.run(scenario())
    assert sorted(workers) == ["w0", "w2"] and killed == [lost]


def test_when_no_worker_starts_the_run_says_why(monkeypatch):
    import ray.exceptions

    launch, setups, killed = _launch_with([ray.exceptions.RayActorError(), ray.exceptions.RayActorError()],
                                          monkeypatch)

    async def scenario():
        launch._setups = setups()
        return await launch.executor(None, None)

    with pytest.raises(ray.exceptions.RayActorError):
        asyncio.run(scenario())
    assert len(killed) == 2 and launch.handles == {}


def test_dispatch_starts_with_the_first_worker_set_up_and_the_others_join(monkeypatch):
    """The executor does not wait for the slowest worker: the ones still starting are handed over to join."""
    from llmap.run.ray import launch as ray_run

    launch, _, killed = _launch_with([None, None, None], monkeypatch)
    made = {}
    monkeypatch.setattr(ray_run, "RayExecutor", lambda handles, *a, **kw: made.update(kw) or handles)

    async def scenario():
        loop = asyncio.get_running_loop()
        launch._setups = {name: loop.create_future() for name in launch.handles}
        launch._setups["w1"].set_result("node")
        return await launch.executor(None, None)

    workers = asyncio.run(scenario())
    assert list(workers) == ["w1"] and sorted(made["joining"]) == ["w0", "w2"] and killed == []
