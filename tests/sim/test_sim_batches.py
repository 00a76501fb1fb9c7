"""The simulator's batch APIs over HTTP: OpenAI Files + Batch, Anthropic Message Batches.

The simulator runs on a fake clock (:data:`TIME`): a batch moves on only when a test moves the clock, so nothing
here waits for real time.
"""

from __future__ import annotations

import json
import uuid

import pytest

from _support import FakeTime
from llmap.sim import Simulator

SCHEMA = {"type": "object", "properties": {"label": {"type": "string", "enum": ["yes", "no"]}},
          "required": ["label"], "additionalProperties": False}
ANT = {"anthropic-version": "2023-06-01", "x-api-key": "k"}
#: The shared simulator's clock (seconds); its batch timelines follow it.
TIME = FakeTime()


@pytest.fixture(scope="module")
def shared():
    with Simulator(batch_time=0.2, seed=7, clock=TIME.clock, sleep=TIME.sleep) as s:
        yield s


@pytest.fixture
def sim(shared):
    shared.reset_stats()
    shared.reconfigure(batch_time=0.2, batch_window=86_400.0, batch_fail_rate=0.0, batch_max_requests=50_000,
                       batch_max_tokens=None, batch_max_bytes=200_000_000, batch_cancel_time=0.1)
    return shared


def line(i: int, *, model: str = "sim", text: str | None = None) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": text or f"row {i}"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}}}
    return {"custom_id": f"t-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}


def upload(http, sim, lines: list[dict], purpose: str = "batch"):
    boundary = uuid.uuid4().hex
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    raw = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n"
           f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"b.jsonl\"\r\n"
           f"Content-Type: application/jsonl\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return http(sim.base_url + "/files", raw=raw, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})


def create(http, sim, lines: list[dict], **extra):
    f = upload(http, sim, lines)
    assert f.status == 200, f.text
    body = {"input_file_id": f.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h",
            "metadata": {"llmap_tag": "x"}, **extra}
    r = http(sim.base_url + "/batches", body)
    assert r.status == 200, r.text
    return r.json()


def wait(http, sim, bid: str, until=("completed", "expired", "cancelled", "failed"), timeout: float = 5.0) -> dict:
    """Move the simulator's clock in 50 ms steps until the batch reaches ``until`` (at most ``timeout`` seconds)."""
    for _ in range(round(timeout / 0.05) + 1):
        doc = http(sim.base_url + f"/batches/{bid}").json()
        if doc["status"] in until:
            return doc
        TIME.advance(0.05)
    raise AssertionError(f"batch {bid} still {doc['status']} after {timeout} s")


def content(http, sim, file_id: str) -> list[dict]:
    return [json.loads(x) for x in http(sim.base_url + f"/files/{file_id}/content").text.splitlines() if x]


def test_a_batch_runs_to_completed_with_an_output_file_of_chat_completions(http, sim):
    doc = create(http, sim, [line(i) for i in range(6)])
    assert doc["status"] == "validating" and doc["object"] == "batch" and doc["metadata"] == {"llmap_tag": "x"}
    done = wait(http, sim, doc["id"])
    assert done["status"] == "completed" and done["request_counts"] == {"total": 6, "completed": 6, "failed": 0}
    assert done["completed_at"] and done["error_file_id"] is None
    out = content(http, sim, done["output_file_id"])
    assert sorted(x["custom_id"] for x in out) == [f"t-{i}" for i in range(6)]
    first = out[0]
    assert first["error"] is None and first["response"]["status_code"] == 200
    assert json.loads(first["response"]["body"]["choices"][0]["message"]["content"])["label"] in ("yes", "no")
    assert sim.stats()["batches"]["lines"] == 6


def test_uploads_over_the_size_or_of_another_purpose_are_refused(http, sim):
    sim.reconfigure(batch_max_bytes=100)
    r = upload(http, sim, [line(i) for i in range(3)])
    assert r.status == 400 and r.json()["error"]["message"] == "File is too large."
    sim.reconfigure(batch_max_bytes=10_000)
    assert upload(http, sim, [line(0)], purpose="fine-tune").status == 400


def test_a_batch_over_the_request_cap_fails_validation(http, sim):
    sim.reconfigure(batch_max_requests=3)
    doc = wait(http, sim, create(http, sim, [line(i) for i in range(5)])["id"])
    assert doc["status"] == "failed" and doc["failed_at"]
    assert "at most 3 requests" in doc["errors"]["data"][0]["message"]
    assert sim.stats()["batches"]["refused"] == 1 and sim.stats()["batches"]["lines"] == 0


def test_token_limit_exceeded_counts_only_unfinished_accepted_batches(http, sim):
    sim.reconfigure(batch_time=2.0, batch_max_tokens=30)  # each line is 6 prompt tokens here
    first = create(http, sim, [line(i) for i in range(4)])  # 24 tokens: queued
    second = wait(http, sim, create(http, sim, [line(i + 10) for i in range(2)])["id"])  # 24 + 12 > 30
    assert second["status"] == "failed"
    err = second["errors"]["data"][0]
    assert err["code"] == "token_limit_exceeded" and "Enqueued token limit reached for sim" in err["message"]
    third = create(http, sim, [line(20)])  # 24 + 6 fits: the refused batch does not count
    assert wait(http, sim, third["id"], until=("in_progress", "finalizing", "completed", "failed"))["status"] \
        != "failed"
    http(sim.base_url + f"/batches/{first['id']}/cancel", {})


def test_an_expired_batch_keeps_its_finished_half_and_lists_the_rest_as_batch_expired(http, sim):
    sim.reconfigure(batch_time=1.0, batch_window=0.5)
    doc = wait(http, sim, create(http, sim, [line(i) for i in range(10)])["id"])
    assert doc["status"] == "expired" and doc["expired_at"]
    out, err = content(http, sim, doc["output_file_id"]), content(http, sim, doc["error_file_id"])
    assert len(out) == 5 and len(err) == 5
    assert {e["error"]["code"] for e in err} == {"batch_expired"} and all(e["response"] is None for e in err)
    assert doc["request_counts"] == {"total": 10, "completed": 5, "failed": 5}


def test_cancel_goes_through_cancelling_to_cancelled(http, sim):
    sim.reconfigure(batch_time=5.0, batch_cancel_time=0.2)
    doc = create(http, sim, [line(i) for i in range(4)])
    r = http(sim.base_url + f"/batches/{doc['id']}/cancel", {})
    assert r.status == 200 and r.json()["status"] == "cancelling"
    done = wait(http, sim, doc["id"])
    assert done["status"] == "cancelled" and done["cancelled_at"]
    assert {e["error"]["code"] for e in content(http, sim, done["error_file_id"])} == {"batch_cancelled"}
    assert http(sim.base_url + f"/batches/{doc['id']}/cancel", {}).status == 400  # already ended


def test_failed_requests_go_to_the_error_file_with_their_status(http, sim):
    sim.reconfigure(batch_fail_rate=1.0)
    doc = wait(http, sim, create(http, sim, [line(i) for i in range(3)])["id"])
    err = content(http, sim, doc["error_file_id"])
    assert [e["response"]["status_code"] for e in err] == [500] * 3
    assert err[0]["response"]["body"]["error"]["type"] == "server_error"
    sim.reconfigure(batch_fail_rate=0.0)
    bad = wait(http, sim, create(http, sim, [line(0, model="bad-request-x")])["id"])  # a 400 per request
    assert content(http, sim, bad["error_file_id"])[0]["response"]["status_code"] == 400


def test_list_is_newest_first_with_pagination(http, sim):
    ids = [create(http, sim, [line(i)])["id"] for i in range(3)]
    page = http(sim.base_url + "/batches?limit=2").json()
    assert [d["id"] for d in page["data"]] == ids[::-1][:2] and page["has_more"]
    rest = http(sim.base_url + f"/batches?limit=2&after={page['last_id']}").json()
    assert ids[0] in [d["id"] for d in rest["data"]]


def ant_request(i: int, model: str = "claude-sim") -> dict:
    return {"custom_id": f"lm-{i}", "params": {
        "model": model, "max_tokens": 64, "messages": [{"role": "user", "content": f"row {i}"}],
        "tools": [{"name": "answer", "input_schema": SCHEMA}], "tool_choice": {"type": "tool", "name": "answer"}}}


def test_message_batches_end_with_results_in_any_order_and_errored_requests(http, sim):
    reqs = [ant_request(i) for i in range(4)] + [ant_request(9, model="bad-request-x")]
    r = http(sim.url + "/v1/messages/batches", {"requests": reqs}, headers=ANT)
    assert r.status == 200, r.text
    doc = r.json()
    assert doc["type"] == "message_batch" and doc["processing_status"] == "in_progress"
    assert doc["request_counts"]["processing"] == 5 and doc["results_url"] is None
    assert http(sim.url + f"/v1/messages/batches/{doc['id']}/results", headers=ANT).status == 404  # not ended
    TIME.advance(0.25)  # past batch_time (0.2 s): every request has run
    ended = http(sim.url + f"/v1/messages/batches/{doc['id']}", headers=ANT).json()
    assert ended["processing_status"] == "ended" and ended["request_counts"]["succeeded"] == 4
    assert ended["request_counts"]["errored"] == 1 and ended["ended_at"]
    lines = [json.loads(x) for x in http(sim.url + f"/v1/messages/batches/{doc['id']}/results",
                                         headers=ANT).text.splitlines()]
    by = {x["custom_id"]: x["result"] for x in lines}
    assert by["lm-0"]["type"] == "succeeded" and by["lm-0"]["message"]["content"][0]["type"] == "tool_use"
    assert by["lm-9"]["type"] == "errored"
    assert by["lm-9"]["error"]["error"]["type"] == "invalid_request_error"


def test_message_batches_refuse_bad_ids_repeats_and_the_request_cap(http, sim):
    def post(reqs):
        return http(sim.url + "/v1/messages/batches", {"requests": reqs}, headers=ANT)

    bad = ant_request(0)
    bad["custom_id"] = "has space"
    assert post([bad]).status == 400
    assert post([ant_request(1), ant_request(1)]).status == 400
    sim.reconfigure(batch_max_requests=2)
    r = post([ant_request(i) for i in range(3)])
    assert r.status == 400 and "at most 2 items" in r.json()["error"]["message"]
    assert http(sim.url + "/v1/messages/batches", {"requests": [ant_request(0)]}).status == 400  # no version


def test_message_batch_cancel_ends_with_canceled_results(http, sim):
    sim.reconfigure(batch_time=5.0, batch_cancel_time=0.1)
    doc = http(sim.url + "/v1/messages/batches", {"requests": [ant_request(i) for i in range(3)]}, headers=ANT).json()
    r = http(sim.url + f"/v1/messages/batches/{doc['id']}/cancel", {}, headers=ANT)
    assert r.json()["processing_status"] == "canceling" and r.json()["cancel_initiated_at"]
    TIME.advance(0.15)  # past batch_cancel_time (0.1 s)
    ended = http(sim.url + f"/v1/messages/batches/{doc['id']}", headers=ANT).json()
    assert ended["processing_status"] == "ended" and ended["request_counts"]["canceled"] == 3
    listed = http(sim.url + "/v1/messages/batches?limit=1", headers=ANT).json()
    assert listed["data"][0]["id"] == doc["id"]
