"""AnswerCache (the run's view of the response cache): a row looked up ahead never misses an answer
that arrived and was written to SQLite between its lookup and its turn."""

from __future__ import annotations

import pytest

from llmap.store.answers import AnswerCache
from llmap.store.cache import CacheEntry, ResponseCache


@pytest.fixture()
def answers(tmp_path):
    cache = ResponseCache(tmp_path / "responses.sqlite")
    yield AnswerCache(cache)
    cache.close()


def _entry(key: str) -> CacheEntry:
    return CacheEntry(key=key, model="openai:m", output={"kind": "city"}, prompt_tokens=10, completion_tokens=3)


async def test_an_answer_written_after_a_lookup_ahead_missed_is_still_found(answers):
    answers.prefetch(["k"])  # a page of rows is looked up ahead: "k" is not stored yet
    assert answers.lead("k")  # an identical row of an earlier page leads "k" ...
    answers.resolve("k", _entry("k"))  # ... its answer arrives ...
    assert answers.flush() == 1  # ... and is written to SQLite before the looked-up row's turn
    hit = answers.peek("k")
    assert hit is not None and hit.output == {"kind": "city"}  # one request for both rows, not two


async def test_an_answer_in_memory_at_the_lookup_and_written_before_the_turn_is_still_found(answers):
    assert answers.lead("k")
    answers.resolve("k", _entry("k"))  # in memory, not written yet
    answers.prefetch(["k"])  # the lookup ahead skips it: memory has it
    answers.flush()  # written: the memory copy must stay for the row looked up ahead
    assert answers.peek("k") is not None


async def test_written_answers_nobody_waits_for_leave_memory(answers):
    assert answers.lead("k")
    answers.resolve("k", _entry("k"))
    answers.flush()
    assert "k" not in answers._recent  # memory stays bounded: SQLite has it
    answers.prefetch(["k"])
    assert answers.peek("k") is not None  # found by the next lookup ahead


async def test_identical_rows_of_one_page_are_all_answered_by_one_stored_answer(answers, tmp_path):
    answers.cache.put_many([_entry("k")], wait=True)
    answers.prefetch(["k", "k", "k"])  # three identical rows in one page, answered before
    hits = [answers.peek("k") for _ in range(3)]
    assert all(h is not None for h in hits)  # not only the first: the others would be sent again
    assert answers.hits == 3


async def test_a_row_that_waits_for_an_identical_request_releases_its_lookup(answers):
    answers.prefetch(["k", "k"])
    answers.peek("k")  # the first row leads "k"
    answers.pass_over("k")  # the second waits for it
    assert answers.lead("k")
    answers.resolve("k", _entry("k"))
    answers.flush()
    assert "k" not in answers._recent  # nothing looked up ahead wants it: memory stays bounded


@pytest.mark.parametrize("params", [None, {"reasoning_effort": "low", "seed": 7}, {"user": "me"}])
def test_the_user_keyer_gives_the_key_of_the_whole_request(params):
    from llmap.spec import ModelSpec

    model = ModelSpec(provider="openai", name="gpt-x", base_url="http://h/v1", temperature=0.2, max_tokens=99,
                      **({"params": params} if params else {}))
    head = [{"role": "system", "content": "Sort «people»."}, {"role": "user", "content": "ex"},
            {"role": "assistant", "content": '{"k": 1}'}]
    schema = {"type": "object", "properties": {"k": {"type": "integer"}}}
    keyer = AnswerCache.user_keyer(model, head, schema)
    for content in ["Name: Ann", 'quote " and \\ and \n newline', "ünïcode ✓", ""]:
        assert keyer(content) == AnswerCache.key(model, [*head, {"role": "user", "content": content}], schema)
    # an answer parameter changes the key; a neutral one does not
    plain = AnswerCache.user_keyer(ModelSpec(provider="openai", name="gpt-x", base_url="http://h/v1",
                                             temperature=0.2, max_tokens=99), head, schema)
    assert (keyer("x") == plain("x")) == (params in (None, {"user": "me"}))
