"""The batch path end to end against the simulator's OpenAI Batch API (``[model] batch = true``)."""

from __future__ import annotations

import json
import sqlite3
import urllib.request
from pathlib import Path

import pytest

from _support import job_toml, people, write_csv
from llmap.engine import Job
from llmap.errors import SpecError
from llmap.observe.progress import CountingProgress
from llmap.sim import Simulator
from llmap.sim.answers import prompt_tokens

PRICES = "price_in = 1.0\nprice_out = 2.0\n"


def make(tmp: Path, sim: Simulator, n: int = 20, *, batch: str = "", model: str = "", rows=None,
         prompt: str = "") -> Path:
    write_csv(tmp / "people.csv", rows or people(n))
    toml = job_toml(sim.base_url, model_extra="batch = true\n" + model, prompt_extra=prompt)
    job = tmp / "job.toml"
    job.write_text(toml + "[batch]\npoll_s = 0.05\n" + batch, encoding="utf-8")
    return job


def run(job: Path, **kw):
    progress = CountingProgress()
    res = Job.from_toml(job).run(progress=progress, **kw)
    return res, progress


def ledger(tmp: Path) -> sqlite3.Connection:
    return sqlite3.connect(tmp / ".llmap" / "job.ledger.sqlite")


def paths(tmp: Path) -> dict[tuple[str, str], int]:
    """(path, outcome) -> requests of the latest run's request log."""
    with ledger(tmp) as db:
        return {(p or "realtime", o): n for p, o, n in db.execute(
            "SELECT path, outcome, count(*) FROM requests WHERE run = (SELECT max(id) FROM runs) GROUP BY 1, 2")}


def test_every_row_by_batch_at_half_price_and_the_cache_sends_nothing_again(tmp_path):
    with Simulator(batch_time=0.2) as sim:
        job = make(tmp_path, sim, 20, model=PRICES)
        res, progress = run(job)
        assert res.exit_code == 0 and res.counts["done"] == 20
        st = sim.stats()
        assert st["requests"] == 0  # nothing in real time
        assert st["batches"]["created"] == 1 and st["batches"]["lines"] == 20
        assert paths(tmp_path) == {("batch", "200"): 20}
        with ledger(tmp_path) as db:
            pt, ct, cost = db.execute("SELECT sum(prompt_tokens), sum(completion_tokens), sum(cost_usd) "
                                      "FROM requests").fetchone()
            state, status = db.execute("SELECT state, status FROM batches").fetchone()
        assert cost == pytest.approx(0.5 * (pt * 1.0 + ct * 2.0) / 1e6) and res.cost_usd == pytest.approx(cost)
        assert (state, status) == ("collected", "completed")
        assert any("submitted batch 1" in m for m in progress.messages)
        # Answers went into the response cache: a fresh start answers every row from it, submitting nothing.
        res2, _ = run(job, fresh=True)
        assert res2.counts["done"] == 20 and res2.requests == 0
        assert sim.stats()["batches"]["created"] == 1


def test_duplicate_requests_are_submitted_once(tmp_path):
    rows = [{"id": f"r{i}", "name": f"Person {i % 5}", "city": "Cody", "age": 1} for i in range(15)]
    with Simulator(batch_time=0.2) as sim:
        res, _ = run(make(tmp_path, sim, rows=rows))
        assert res.counts["done"] == 15
        assert sim.stats()["batches"]["lines"] == 5  # one line per unique request
        with ledger(tmp_path) as db:
            sources = dict(db.execute("SELECT source, count(*) FROM rows GROUP BY source").fetchall())
        assert sources == {"model": 5, "cache": 10}


def test_an_expired_batch_keeps_its_finished_half(tmp_path):
    with Simulator(batch_time=1.0, batch_window=0.5) as sim:
        res, progress = run(make(tmp_path, sim, 20))
        assert res.exit_code == 0 and res.counts["done"] == 20
        assert sim.stats()["batches"]["expired"] == 1
        assert paths(tmp_path) == {("batch", "200"): 10, ("batch", "expired"): 10, ("realtime", "200"): 10}
        assert sim.stats()["requests"] == 10  # only the unfinished half went in real time
        assert any("expired: 10 rows done, 10 to real time" in m for m in progress.messages)


@pytest.mark.parametrize("retry", ["realtime", "batch"])
def test_error_file_lines_are_retried_by_either_policy(tmp_path, retry):
    with Simulator(batch_time=0.2, batch_fail_rate=0.15, seed=11) as sim:
        res, progress = run(make(tmp_path, sim, 30, batch=f'retry = "{retry}"\n'))
        st = sim.stats()
        assert res.exit_code == 0 and res.counts["done"] == 30
        assert max(done for done, _, _ in progress.advances) == 30  # each row counted once
        failed = st["batches"]["failed_lines"]
        assert failed > 0
        if retry == "realtime":
            assert st["batches"]["created"] == 1 and st["requests"] == failed
        else:
            assert st["batches"]["created"] >= 2 and st["requests"] == 0
            assert st["batches"]["lines"] == 30 + failed  # unique rows plus the failed ones, nothing else
        assert st["batches"]["custom_ids_repeated"] == 0


def test_terminal_errors_fail_the_row_with_the_providers_message(tmp_path):
    with Simulator(batch_time=0.2) as sim:
        job = make(tmp_path, sim, 4)
        job.write_text(job.read_text().replace('name = "sim"', 'name = "bad-request-x"'))
        res, _ = run(job)
        assert res.counts["failed"] == 4 and sim.stats()["requests"] == 0  # a 4xx is not retried
        with ledger(tmp_path) as db:
            errors = {e for (e,) in db.execute("SELECT error FROM rows")}
        assert len(errors) == 1 and "simulated bad request" in errors.pop()


def test_a_batch_over_the_request_cap_is_split_in_two(tmp_path):
    with Simulator(batch_time=0.2, batch_max_requests=20) as sim:
        res, progress = run(make(tmp_path, sim, 30))
        st = sim.stats()["batches"]
        assert res.exit_code == 0 and res.counts["done"] == 30
        assert (st["refused"], st["created"], st["refused_lines"], st["lines"]) == (1, 2, 30, 30)
        with ledger(tmp_path) as db:
            assert [r for (r,) in db.execute("SELECT requests FROM batches ORDER BY id")] == [30, 15, 15]
        assert any("refused for its size" in m for m in progress.messages)


def test_token_limit_exceeded_waits_for_running_batches_and_never_loops(tmp_path):
    rows = people(20)
    sys_msg = {"role": "system", "content": "You sort people."}
    tokens = [prompt_tokens([sys_msg, {"role": "user", "content": f"Name: {r['name']}; city: {r['city']}."}])
              for r in rows]
    cap = sum(tokens[:10]) + sum(tokens[10:]) // 2  # one batch of 10 fits; two at once do not
    with Simulator(batch_time=0.4, batch_max_tokens=cap) as sim:
        res, progress = run(make(tmp_path, sim, rows=rows, batch="max_requests = 10\n"))
        st = sim.stats()["batches"]
        assert res.exit_code == 0 and res.counts["done"] == 20
        assert st["refused"] == 1 and st["created"] == 2  # refused once, resubmitted once: no loop
        assert any("go again once running batches end" in m for m in progress.messages)


def test_the_deadline_hands_the_rest_to_real_time(tmp_path):
    with Simulator(batch_time=2.0, batch_cancel_time=0.1) as sim:
        res, progress = run(make(tmp_path, sim, 20, batch='deadline = "1s"\n'))
        assert res.exit_code == 0 and res.counts["done"] == 20
        st = sim.stats()
        assert st["batches"]["cancelled"] == 1
        by_path = paths(tmp_path)
        finished = by_path.get(("batch", "200"), 0)
        assert 0 < finished < 20 and by_path[("realtime", "200")] == 20 - finished == st["requests"]
        assert by_path[("batch", "cancelled")] == 20 - finished
        assert any("passed [batch] deadline" in m for m in progress.messages)


def test_packed_lines_and_damaged_items_go_again_alone(tmp_path):
    with Simulator(batch_time=0.2, corrupt_item_rate=0.2, seed=5) as sim:
        res, _ = run(make(tmp_path, sim, 40, prompt="pack = 5", batch='retry = "batch"\n'))
        st = sim.stats()["batches"]
        assert res.exit_code == 0 and res.counts["done"] == 40
        assert st["created"] >= 2 and sim.stats()["requests"] == 0
        with ledger(tmp_path) as db:
            first = db.execute("SELECT requests FROM batches ORDER BY id LIMIT 1").fetchone()[0]
        assert first == 8  # 40 rows in packs of 5


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


def test_an_invalid_answer_is_re_asked_in_the_next_batch(tmp_path, monkeypatch):
    from llmap.errors import AnswerInvalid
    from llmap.prompt.schema import OutputSchema

    real = OutputSchema.validate
    calls = []

    def first_invalid(self, content):  # the first batch's 3 answers are refused, later ones checked as usual
        calls.append(content)
        if len(calls) <= 3:
            raise AnswerInvalid("kind: not allowed")
        return real(self, content)

    monkeypatch.setattr(OutputSchema, "validate", first_invalid)
    with Simulator(batch_time=0.2) as sim:
        res, _ = run(make(tmp_path, sim, 3, batch='retry = "batch"\n'))
        assert res.counts["done"] == 3 and sim.stats()["batches"]["created"] == 2
        with ledger(tmp_path) as db:
            second = db.execute("SELECT provider_id FROM batches ORDER BY id DESC LIMIT 1").fetchone()[0]
        doc = json.loads(get(sim.base_url + f"/batches/{second}"))
        lines = [json.loads(x) for x in get(sim.base_url + f"/files/{doc['input_file_id']}/content").splitlines()]
        last = [ln["body"]["messages"][-2:] for ln in lines]
        assert all(a["role"] == "assistant" and "Your answer was invalid: kind: not allowed" in u["content"]
                   for a, u in last)


@pytest.mark.parametrize(("extra", "words"), [
    ('[model]\nprovider = "local"\nbatch = true\n', "batch = true needs provider"),
    ('[[model]]\nprovider = "openai"\nname = "a"\n[[model]]\nprovider = "openai"\nname = "b"\nbatch = true\n',
     "only the first [[model]] can go by batch"),
    ('[model]\nprovider = "openai"\nname = "a"\n[batch]\npoll_s = 1\n', "[batch] is set but no [model] has batch"),
    ('[model]\nprovider = "openai"\nname = "a"\nbatch = true\n[batch]\ndeadline = "soon"\n', "not a duration"),
    ('[model]\nprovider = "openai"\nname = "a"\nbatch = true\n[batch]\nmax_bytes = "lots"\n', "is not a size"),
])
def test_bad_batch_specs_are_one_line_errors(tmp_path, extra, words):
    write_csv(tmp_path / "people.csv", people(2))
    base = ('[input]\npath = "people.csv"\nkey = "id"\n[prompt]\nuser = "{{ name }}"\n[output]\npath = "o.jsonl"\n'
            '[output.fields]\nkind = { type = "string" }\n')
    (tmp_path / "job.toml").write_text(base + extra)
    with pytest.raises(SpecError) as exc:
        Job.from_toml(tmp_path / "job.toml")
    assert words in str(exc.value) and "\n" not in str(exc.value)


def test_per_group_and_batch_do_not_mix(tmp_path):
    with Simulator() as sim:
        job = make(tmp_path, sim, 2)
        job.write_text(job.read_text().replace('key = "id"', 'key = "id"\nper_group = { column = "city", n = 1 }'))
        with pytest.raises(SpecError, match="per_group"):
            Job.from_toml(job)


def test_the_cost_cap_stops_before_a_batch_that_could_pass_it(tmp_path):
    with Simulator(batch_time=0.2) as sim:
        job = make(tmp_path, sim, 10, model=PRICES)
        job.write_text(job.read_text().replace("[limits]", "[limits]\nmax_cost_usd = 0.0001"))
        res, _ = run(job)
        assert res.exit_code == 1 and "budget cap" in res.stop_reason and res.counts["pending"] == 10
        assert sim.stats()["batches"]["created"] == 0


def test_a_row_changed_while_its_batch_runs_is_not_settled_by_the_old_answer(tmp_path):
    with Simulator(batch_time=1.0) as sim:
        job = make(tmp_path, sim, 4)
        first = Job.from_toml(job).run(detach=True)
        assert first.exit_code == 0 and len(first.batches) == 1
        job.write_text(job.read_text().replace("Name: {{ name }}", "Person: {{ name }}"))  # every request changes
        sim.reconfigure(batch_time=2.5)  # the old batch ends first, with answers to the old requests
        res, _ = run(job)
        assert res.counts["done"] == 4
        st = sim.stats()["batches"]
        assert st["created"] == 2 and st["lines"] == 8  # the changed rows went again at once, in a new batch
        with ledger(tmp_path) as db:
            ended = dict(db.execute("SELECT id, ended_at FROM batches"))
            settled = [t for (t,) in db.execute("SELECT updated_at FROM rows")]
            billed = db.execute("SELECT count(*) FROM requests WHERE path = 'batch' AND outcome = '200'").fetchone()
        assert ended[1] < ended[2] - 1 and min(settled) >= ended[2] - 0.5  # settled by the new batch only
        assert billed[0] == 8  # the old batch's answers are billed (and cached), not used
