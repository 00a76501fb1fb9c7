"""MisconfigDetector: identical refusals are a configuration error; outages and varied errors are not."""

from __future__ import annotations

import pytest

from llmap import errors as E
from llmap.control.misconfig import MisconfigDetector, likely_fix, signature, verdict_message


def bad(msg="HTTP 404: The model `gpt-x` does not exist", status=404):
    return E.BadRequest(msg, status=status)


def test_first_requests_failing_identically_are_a_configuration_error():
    d = MisconfigDetector(first=3)
    assert not d.failure(0, bad()) and not d.failure(0, bad())
    assert d.failure(0, bad())
    assert d.failure(0, bad())  # and it stays so


def test_request_ids_and_counts_do_not_hide_a_repeat():
    d = MisconfigDetector(first=2)
    assert not d.failure(0, bad("HTTP 400: refused (request id: 20241022210315850288268h2ZnBgbC)", 400))
    assert d.failure(0, bad("HTTP 400: refused (request id: 20241022210316111111111aaaaaaaaa)", 400))


def test_an_outage_never_counts():
    d = MisconfigDetector(first=3, streak=5)
    for _ in range(10):  # one model, 10 x 503, then healthy
        assert not d.failure(0, E.Overloaded("HTTP 503: The server is overloaded", status=503))
    for exc in (E.RateLimited("HTTP 429", status=429), E.RequestTimeout("timed out"),
                E.ContextTooLong("HTTP 400: maximum context length", status=400)):
        assert not d.failure(0, exc)
    d.success(0)
    assert signature(E.Overloaded("x")) is None and signature(E.ContextTooLong("x")) is None


def test_varied_errors_or_an_answer_first_are_not():
    d = MisconfigDetector(first=3, streak=20)
    assert not d.failure(0, bad("HTTP 400: refused alpha", 400))
    assert not d.failure(0, bad("HTTP 400: refused beta", 400))
    for _ in range(5):
        assert not d.failure(0, bad("HTTP 400: refused beta", 400))  # the first three differed
    d2 = MisconfigDetector(first=3, streak=4)
    d2.success(1)
    assert [d2.failure(1, bad()) for _ in range(4)] == [False, False, False, True]  # after answers: the streak
    d2.success(1)
    assert not d2.failure(1, bad())  # an answer resets the streak


def test_models_are_judged_separately():
    d = MisconfigDetector(first=2)
    assert not d.failure(0, bad()) and not d.failure(1, bad())
    d.success(1)
    assert d.failure(0, bad()) and not d.failure(1, bad())


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        MisconfigDetector(first=0)


@pytest.mark.parametrize(("exc", "structured", "fix"), [
    (bad(), "auto", "check [model] name"),
    (E.BadRequest("HTTP 500: 1 validation error: body.response_format.type: Input should be 'text' or "
                  "'json_object'", status=500), "json_schema", 'set [model] structured = "auto"'),
    (E.BadRequest("HTTP 400: Unsupported parameter: 'max_tokens' is not supported with this model.", status=400),
     "auto", "check [model] params"),
    (E.BadRequest("HTTP 400: Invalid API version", status=400), "auto", "[model] query"),
    (E.BadRequest("HTTP 400: something else", status=400), "auto", "check the [model] table"),
])
def test_likely_fix_names_the_setting(exc, structured, fix):
    assert fix in likely_fix(exc, structured=structured)
    line = verdict_message("openai:x", exc, structured=structured)
    assert "\n" not in line and str(exc) in line and line.startswith("openai:x refused every request")
