"""``llmap cache stats | prune | clear`` through Typer's test runner."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmap.cli import app
from llmap.store.cache import FILE_NAME, CacheEntry, ResponseCache

runner = CliRunner()


def llmap(*args: str, input: str | None = None):
    return runner.invoke(app, ["cache", *args], input=input)


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    """A cache folder with 3 entries: two 2 days old, one new; one entry served twice."""
    now = time.time()
    with ResponseCache(tmp_path / FILE_NAME) as c:
        c.put_many(
            [
                CacheEntry("a", "openai:gpt-4o-mini", {"v": 1}, created_at=now - 2 * 86400),
                CacheEntry("b", "anthropic:claude-haiku", {"v": 2}, created_at=now - 2 * 86400),
                CacheEntry("c", "openai:gpt-4o-mini", {"v": 3}),
            ]
        )
        c.get_many(["c"])
        c.get_many(["c"])
    return tmp_path


def entries(folder: Path) -> int:
    with ResponseCache(folder / FILE_NAME) as c:
        return c.stats().entries


def test_help_teaches_with_examples() -> None:
    result = llmap("--help")
    assert result.exit_code == 0
    assert "llmap cache prune --older-than 30d" in result.output
    assert "--older-than 1w2d" in llmap("prune", "--help").output


def test_stats_when_nothing_is_cached_yet(tmp_path: Path) -> None:
    result = llmap("stats", "--cache-dir", str(tmp_path / "none"))
    assert result.exit_code == 0, result.output
    assert "nothing cached yet" in result.output
    assert not (tmp_path / "none").exists()  # looking must not create the cache


def test_stats_of_an_empty_cache(tmp_path: Path) -> None:
    ResponseCache(tmp_path / FILE_NAME).close()
    result = llmap("stats", "--cache-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert re.search(r"entries\W+0\b", result.output)
    assert re.search(r"oldest\W+-", result.output)
    assert "entries per model" not in result.output


def test_stats_of_a_filled_cache(filled: Path) -> None:
    result = llmap("stats", "--cache-dir", str(filled))
    assert result.exit_code == 0, result.output
    assert re.search(r"entries\W+3\b", result.output)
    assert re.search(r"hits\W+2\b", result.output)
    assert re.search(r"oldest.*\(2d ago\)", result.output)
    assert re.search(r"openai:gpt-4o-mini\W+2\b", result.output)
    assert re.search(r"anthropic:claude-haiku\W+1\b", result.output)


def test_stats_uses_llmap_cache_dir_by_default(filled: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMAP_CACHE_DIR", str(filled))
    assert re.search(r"entries\W+3\b", llmap("stats").output)


def test_prune_removes_old_entries(filled: Path) -> None:
    result = llmap("prune", "--older-than", "1d", "--cache-dir", str(filled))
    assert result.exit_code == 0, result.output
    assert "Removed 2 cached answers older than 1d" in result.output
    assert entries(filled) == 1
    assert "Removed 0" in llmap("prune", "--older-than", "1w", "--cache-dir", str(filled)).output


def test_prune_refuses_a_bad_duration(filled: Path) -> None:
    result = llmap("prune", "--older-than", "30", "--cache-dir", str(filled))
    assert result.exit_code == 2
    assert "has no unit" in result.output
    assert entries(filled) == 3


def test_clear_yes_removes_everything(filled: Path) -> None:
    result = llmap("clear", "--yes", "--cache-dir", str(filled))
    assert result.exit_code == 0, result.output
    assert "Removed 3 cached answers" in result.output
    assert entries(filled) == 0


def test_clear_asks_first(filled: Path) -> None:
    result = llmap("clear", "--cache-dir", str(filled), input="n\n")
    assert result.exit_code == 1
    assert "Remove all 3 cached answers" in result.output
    assert entries(filled) == 3
    result = llmap("clear", "--cache-dir", str(filled), input="y\n")
    assert result.exit_code == 0, result.output
    assert "Removed 3 cached answers" in result.output
    assert entries(filled) == 0
