"""The simulator's log-probabilities (OpenAI's shape) and its calibrated models."""

from __future__ import annotations

import json
import math

import pytest

from llmap.prompt.schema import OutputSchema
from llmap.quality.confidence import Confidence
from llmap.sim import Simulator
from llmap.sim.calibrated import floor, true_ece, truth
from llmap.spec import FieldSpec

FIELDS = {"kind": FieldSpec(type="string", enum=["a", "b", "c"]), "ok": FieldSpec(type="boolean")}
SCHEMA = OutputSchema(FIELDS).json_schema


def _body(model: str, text: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}},
            **extra}


def test_floor_gives_the_expected_accuracy_and_the_ece_of_each_curve():
    lo = floor(0.8, 2.0)
    assert (1 - lo ** 3) / (3 * (1 - lo)) == pytest.approx(0.8, abs=1e-9)
    assert floor(0.8, 1.0) == pytest.approx(0.6) and floor(0.2, 1.0) == 0.0
    assert true_ece(0.8, 1.0) == 0.0
    lo = floor(0.7, 2.0)  # E[c - c^2] over U[lo, 1]
    exact = ((1 - lo ** 2) / 2 - (1 - lo ** 3) / 3) / (1 - lo)
    assert true_ece(0.7, 2.0) == pytest.approx(exact, abs=1e-6)


def test_logprobs_come_back_in_openai_shape_only_when_asked_and_their_joint_is_the_confidence(post_chat):
    with Simulator(accuracy=0.7) as sim:
        plain = post_chat(sim, _body("m", "row 1")).json()
        assert plain["choices"][0]["logprobs"] is None
        doc = post_chat(sim, _body("m", "row 1", logprobs=True, top_logprobs=2)).json()
    choice = doc["choices"][0]
    content = choice["message"]["content"]
    tokens = choice["logprobs"]["content"]
    assert "".join(t["token"] for t in tokens) == content
    assert all(set(t) == {"token", "logprob", "bytes", "top_logprobs"} for t in tokens)
    assert all(t["top_logprobs"][0]["token"] == t["token"] and len(t["top_logprobs"]) <= 2 for t in tokens)
    conf = Confidence(FIELDS).row(content, tuple((t["token"], t["logprob"]) for t in tokens))
    reported = math.exp(sum(t["logprob"] for t in tokens))
    assert conf == pytest.approx(reported) and 0 < conf < 1


def test_a_calibrated_model_is_right_against_the_shared_truth_as_often_as_set(post_chat):
    answers = {"good": 0, "bad": 0}
    with Simulator(model_accuracy="good=0.95,bad=0.5") as sim:
        for i in range(300):
            text = f"item {i}"
            true = truth(SCHEMA, text)
            for model in answers:
                got = json.loads(post_chat(sim, _body(model, text)).json()["choices"][0]["message"]["content"])
                answers[model] += got["kind"] == true["kind"]
    assert answers["good"] / 300 == pytest.approx(0.95, abs=0.05)
    assert answers["bad"] / 300 == pytest.approx(0.5, abs=0.08)


def test_a_server_that_refuses_logprobs_says_so_like_openai(post_chat):
    with Simulator(refuse_logprobs=True) as sim:
        r = post_chat(sim, _body("m", "x", logprobs=True))
        ok = post_chat(sim, _body("m", "x"))
    assert r.status == 400 and r.json()["error"]["param"] == "logprobs" and ok.status == 200
