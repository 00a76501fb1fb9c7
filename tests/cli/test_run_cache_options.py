"""``--fresh`` still answers from the response cache (now said in its help); ``--no-cache`` asks the model again."""

from __future__ import annotations

from typer.testing import CliRunner

from _support import chat_requests
from llmap.cli import app

runner = CliRunner()


def test_fresh_answers_from_the_cache_and_no_cache_asks_again(make_job, sim):
    job = make_job(5)
    assert runner.invoke(app, ["run", str(job)]).exit_code == 0
    assert chat_requests(sim) == 5
    res = runner.invoke(app, ["run", str(job), "--fresh"])
    assert res.exit_code == 0 and chat_requests(sim) == 5 and "0 requests" in res.stderr
    res = runner.invoke(app, ["run", str(job), "--fresh", "--no-cache"])
    assert res.exit_code == 0 and chat_requests(sim) == 10 and "5 requests" in res.stderr
    # --no-cache did not store its answers, but the cache still holds the first run's
    res = runner.invoke(app, ["run", str(job), "--fresh"])
    assert res.exit_code == 0 and chat_requests(sim) == 10


def test_no_cache_alone_asks_only_the_rows_not_done(make_job, sim):
    job = make_job(4)
    assert runner.invoke(app, ["run", str(job), "--limit", "2"]).exit_code == 0
    res = runner.invoke(app, ["run", str(job), "--no-cache"])
    assert res.exit_code == 0 and chat_requests(sim) == 4
