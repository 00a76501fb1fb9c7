"""The response cache: keys, round trips, TTL and stale-if-error, hits, pruning, sharing."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from pathlib import Path

import pytest

from llmap.durations import parse_duration
from llmap.store.cache import (
    FILE_NAME,
    CacheEntry,
    ResponseCache,
    default_cache_dir,
    request_key,
)

from .conftest import FakeClock

BASE = {
    "provider": "openai",
    "model": "gpt-4o-mini",
    "params": {"temperature": 0.0, "max_tokens": 200},
    "messages": [
        {"role": "system", "content": "Classify the district."},
        {"role": "user", "content": "Zürich Nord"},
    ],
    "schema": {"type": "object", "properties": {"kind": {"type": "string"}}, "required": ["kind"]},
}


def entry(key: str, model: str = "openai:gpt-4o-mini", **kw) -> CacheEntry:
    return CacheEntry(key=key, model=model, output=kw.pop("output", {"kind": key}), **kw)


@pytest.fixture
def cache(tmp_path: Path, clock: FakeClock):
    with ResponseCache(tmp_path / "c" / FILE_NAME, clock=clock) as c:
        yield c


# -- keys ---------------------------------------------------------------------
def test_key_is_sha256_of_the_canonical_json() -> None:
    canonical = (
        '{"messages":[{"content":"Classify the district.","role":"system"},'
        '{"content":"Zürich Nord","role":"user"}],"model":"gpt-4o-mini",'
        '"params":{"max_tokens":200,"temperature":0.0},"provider":"openai",'
        '"schema":{"properties":{"kind":{"type":"string"}},"required":["kind"],"type":"object"}}'
    )
    assert request_key(**BASE) == hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def test_key_ignores_mapping_order() -> None:
    reordered = dict(BASE)
    reordered["params"] = {"max_tokens": 200, "temperature": 0.0}
    reordered["schema"] = {"required": ["kind"], "properties": {"kind": {"type": "string"}}, "type": "object"}
    reordered["messages"] = [dict(reversed(list(m.items()))) for m in BASE["messages"]]
    assert request_key(**reordered) == request_key(**BASE)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("provider", "anthropic"),
        ("model", "gpt-4o"),
        ("params", {"temperature": 0.5, "max_tokens": 200}),
        ("params", {"temperature": 0.0}),
        ("messages", [{"role": "user", "content": "Zürich Nord"}]),
        ("messages", list(reversed(BASE["messages"]))),
        ("schema", None),
        ("schema", {"type": "object", "properties": {"kind": {"type": "integer"}}, "required": ["kind"]}),
    ],
)
def test_any_change_changes_the_key(field: str, value: object) -> None:
    assert request_key(**{**BASE, field: value}) != request_key(**BASE)


def test_key_refuses_values_that_are_not_json() -> None:
    with pytest.raises(TypeError):
        request_key(**{**BASE, "params": {"stop": {"a", "b"}}})
    with pytest.raises(ValueError):
        request_key(**{**BASE, "params": {"temperature": float("nan")}})


# -- round trip ---------------------------------------------------------------
def test_put_then_get_round_trip(cache: ResponseCache, clock: FakeClock) -> None:
    out = {"kind": "urbain", "score": 0.75, "tags": ["a", "ü"], "nested": {"n": None}}
    assert cache.put_many([entry("k1", output=out, prompt_tokens=120, completion_tokens=9)]) == 1
    got = cache.get_many(["k1", "missing", "k1"])
    assert list(got) == ["k1"]
    e = got["k1"]
    assert (e.key, e.model, e.output) == ("k1", "openai:gpt-4o-mini", out)
    assert (e.prompt_tokens, e.completion_tokens, e.created_at) == (120, 9, clock.now)
    assert e.fresh


def test_get_of_nothing_is_empty(cache: ResponseCache) -> None:
    assert cache.get_many([]) == {}
    assert cache.get_stale_many(["nope"]) == {}
    assert cache.put_many([]) == 0


def test_put_overwrites_keeps_hits_and_restarts_age(cache: ResponseCache, clock: FakeClock) -> None:
    cache.put_many([entry("k", output={"v": 1})])
    cache.get_many(["k"])
    clock.advance(50)
    cache.put_many([entry("k", model="openai:gpt-4o", output={"v": 2})])
    e = cache.get_many(["k"])["k"]
    assert (e.model, e.output, e.created_at, e.hits) == ("openai:gpt-4o", {"v": 2}, clock.now, 2)


def test_put_uses_a_given_created_at(cache: ResponseCache, clock: FakeClock) -> None:
    cache.put_many([entry("k", created_at=123.0)])
    assert cache.get_many(["k"])["k"].created_at == 123.0


def test_put_many_is_all_or_nothing(cache: ResponseCache) -> None:
    with pytest.raises(TypeError):
        cache.put_many([entry("good"), entry("bad", output={"x": object()})])
    assert cache.stats().entries == 0


def test_many_keys_beyond_one_sql_list(cache: ResponseCache) -> None:
    keys = [f"k{i}" for i in range(1234)]
    cache.put_many(entry(k) for k in keys)
    got = cache.get_many(keys)
    assert len(got) == 1234 and got["k1233"].output == {"kind": "k1233"}
    assert cache.stats().hits == 1234


# -- TTL and stale-if-error -----------------------------------------------------
def test_ttl_hides_expired_entries_but_stale_read_returns_them(tmp_path: Path, clock: FakeClock) -> None:
    with ResponseCache(tmp_path / FILE_NAME, ttl_s=100, clock=clock) as c:
        c.put_many([entry("old")])
        clock.advance(60)
        c.put_many([entry("new")])
        clock.advance(39.5)  # old is 99.5 s old: still fresh
        assert set(c.get_many(["old", "new"])) == {"old", "new"}
        clock.advance(0.5)  # old is exactly 100 s old: expired
        assert set(c.get_many(["old", "new"])) == {"new"}
        stale = c.get_stale_many(["old", "new", "missing"])
        assert set(stale) == {"old", "new"}
        assert stale["old"].fresh is False and stale["new"].fresh is True
        assert stale["old"].output == {"kind": "old"}


def test_no_ttl_means_fresh_forever(cache: ResponseCache, clock: FakeClock) -> None:
    cache.put_many([entry("k")])
    clock.advance(10 * 365 * 86400)
    assert cache.get_many(["k"])["k"].fresh


def test_zero_ttl_serves_only_stale(tmp_path: Path, clock: FakeClock) -> None:
    with ResponseCache(tmp_path / FILE_NAME, ttl_s=0, clock=clock) as c:
        c.put_many([entry("k")])
        assert c.get_many(["k"]) == {}
        assert "k" in c.get_stale_many(["k"])


def test_negative_ttl_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        ResponseCache(tmp_path / FILE_NAME, ttl_s=-1)


# -- hits -----------------------------------------------------------------------
def test_hits_are_counted_per_served_entry(cache: ResponseCache, clock: FakeClock) -> None:
    cache.put_many([entry("a"), entry("b"), entry("c")])
    cache.get_many(["a", "b", "zzz"])
    clock.advance(5)
    assert cache.get_many(["a", "a"])["a"].hits == 2  # a duplicate key is one hit
    cache.get_stale_many(["c"])
    rows = dict(
        (k, (h, t))
        for k, h, t in sqlite3.connect(cache.path).execute("SELECT key, hits, last_hit_at FROM responses")
    )
    assert rows == {"a": (2, clock.now), "b": (1, clock.now - 5), "c": (1, clock.now)}
    assert cache.stats().hits == 4


def test_expired_entries_hidden_by_get_many_are_not_hits(tmp_path: Path, clock: FakeClock) -> None:
    with ResponseCache(tmp_path / FILE_NAME, ttl_s=10, clock=clock) as c:
        c.put_many([entry("k")])
        clock.advance(11)
        assert c.get_many(["k"]) == {}
        assert c.stats().hits == 0


# -- prune, clear, stats --------------------------------------------------------
def test_prune_removes_entries_older_than_the_age(cache: ResponseCache, clock: FakeClock) -> None:
    for k in ("t0", "t10", "t20"):
        cache.put_many([entry(k)])
        clock.advance(10)
    # now = start + 30: ages are 30, 20 and 10 s
    assert cache.prune(15) == 2
    assert set(cache.get_stale_many(["t0", "t10", "t20"])) == {"t20"}
    assert cache.prune(15) == 0
    with pytest.raises(ValueError, match="older_than_s"):
        cache.prune(-1)


def test_clear_removes_everything(cache: ResponseCache) -> None:
    cache.put_many(entry(f"k{i}") for i in range(7))
    assert cache.clear() == 7
    assert cache.stats().entries == 0
    assert cache.clear() == 0


def test_stats_of_an_empty_cache(cache: ResponseCache) -> None:
    s = cache.stats()
    assert (s.entries, s.hits, s.oldest_created_at, s.newest_created_at, s.by_model) == (0, 0, None, None, {})
    assert s.size_bytes > 0 and s.path == cache.path


def test_stats_of_a_filled_cache(cache: ResponseCache, clock: FakeClock) -> None:
    start = clock.now
    cache.put_many([entry("a", model="openai:gpt-4o"), entry("b")])
    clock.advance(30)
    cache.put_many([entry("c"), entry("d", output={"long": "x" * 50_000})])
    cache.get_many(["a", "c"])
    s = cache.stats()
    assert (s.entries, s.hits) == (4, 2)
    assert (s.oldest_created_at, s.newest_created_at) == (start, start + 30)
    assert s.by_model == {"openai:gpt-4o-mini": 3, "openai:gpt-4o": 1}
    assert list(s.by_model) == ["openai:gpt-4o-mini", "openai:gpt-4o"]  # most entries first
    assert s.size_bytes > 50_000


def test_vacuum_after_clear_shrinks_the_file(cache: ResponseCache) -> None:
    cache.put_many(entry(f"k{i}", output={"x": "y" * 2000}) for i in range(500))
    before = cache.stats().size_bytes
    cache.clear()
    assert cache.vacuum() is True
    assert cache.stats().size_bytes < before / 10


# -- the file -------------------------------------------------------------------
def test_wal_and_two_connections_see_each_others_writes(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / FILE_NAME
    with ResponseCache(path, clock=clock) as a, ResponseCache(path, clock=clock) as b:
        assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone() == ("wal",)
        a.put_many([entry("k1")])
        assert b.get_many(["k1"])["k1"].output == {"kind": "k1"}
        b.put_many([entry("k2")])
        assert set(a.get_many(["k1", "k2"])) == {"k1", "k2"}
        assert b.clear() == 2
        assert a.get_stale_many(["k1", "k2"]) == {}


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    ResponseCache(path).close()  # schema first, as a first llmap process would
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            with ResponseCache(path) as c:
                for i in range(50):
                    c.put_many([entry(f"w{n}-{i}")])
                    c.get_many([f"w{(n + 1) % 4}-{i}"])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with ResponseCache(path) as c:
        assert c.stats().entries == 200


def test_reopening_keeps_entries_and_does_not_remigrate(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    with ResponseCache(path) as c:
        c.put_many([entry("k")])
    with ResponseCache(path) as c:
        assert "k" in c.get_many(["k"])
    names = sqlite3.connect(path).execute("SELECT name FROM _migrations").fetchall()
    assert names == [("001_responses",), ("002_confidence_latency",)]


def test_default_path_follows_llmap_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMAP_CACHE_DIR", str(tmp_path / "here"))
    assert default_cache_dir() == tmp_path / "here"
    with ResponseCache() as c:
        assert c.path == tmp_path / "here" / "responses.sqlite"
    assert c.path.is_file()


def test_default_cache_dir_without_env_is_the_user_cache_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    from platformdirs import user_cache_dir

    from llmap.providers.local import provider as local

    monkeypatch.delenv("LLMAP_CACHE_DIR", raising=False)
    assert default_cache_dir() == Path(user_cache_dir("llmap"))
    assert local.cache_dir is default_cache_dir


# -- durations ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("45s", 45),
        ("90m", 5400),
        ("12h", 43200),
        ("30d", 30 * 86400),
        ("1w", 7 * 86400),
        ("1d12h", 86400 + 12 * 3600),
        ("1w2d", 9 * 86400),
        ("1h30m15s", 5415),
        ("1.5h", 5400),
        ("0.5w", 3.5 * 86400),
        (" 2D ", 2 * 86400),
        ("0s", 0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "30", "1.5", "abc", "1x", "-1d", "d", "1d-2h", "1w w", "nan"])
def test_parse_duration_refuses_with_a_clear_message(text: str) -> None:
    with pytest.raises(ValueError, match=r"e\.g\. 45s, 90m, 12h, 30d, 1w"):
        parse_duration(text)


def test_cache_ttl_takes_the_durations_the_readme_shows() -> None:
    """``[cache] ttl = "1w"`` is valid (README), and a bare number is refused naming the fix."""
    from llmap.spec import CacheSpec

    assert CacheSpec(ttl="1w").ttl_s == 7 * 86400
    assert CacheSpec(ttl="1d12h").ttl_s == 36 * 3600
    with pytest.raises(ValueError, match='write e.g. "30d"'):
        CacheSpec(ttl="30")
