"""The progress bar stays on one line at 80 and 120 columns (it wrapped onto two)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from llmap.observe.progress import RichProgress, Tally

BUSY = Tally(total=17_842, done=12_345, failed=1_203, skipped=30, fallback=2, prompt_tokens=12_345_678,
             completion_tokens=2_345_678, cache_read_tokens=500_000, requests=12_000, cost_usd=12.3456,
             rate_limited=170, cache_hits=3_000, in_flight=120, concurrency=256, batches="2 batches running",
             started=0.0)


def _rendered_lines(width: int, tally: Tally) -> list[str]:
    live = Console(file=io.StringIO(), width=width, force_terminal=True)  # the terminal the bar draws on
    bar = RichProgress(live)
    bar.start(tally)
    bar.advance(tally)
    shot = Console(file=io.StringIO(), width=width, record=True, color_system=None)  # one frame of it
    shot.print(bar._bar.get_renderable())
    bar.finish(tally)
    return [ln for ln in shot.export_text().splitlines() if ln.strip()]


@pytest.mark.parametrize("width", [80, 120])
@pytest.mark.parametrize("tally", [BUSY, Tally(total=61, done=3), Tally(total=81, done=81, failed=0)])
def test_the_bar_is_one_line_that_fits(width, tally):
    lines = _rendered_lines(width, tally)
    assert len(lines) == 1, lines
    assert len(lines[0].rstrip()) <= width - 1
    assert f"{tally.settled:,}/{tally.total:,}" in lines[0]


def test_the_most_useful_figures_stay_and_the_rest_go_as_the_width_shrinks():
    from llmap.observe.progress import progress_line

    wide = progress_line(BUSY, 250, base=0, now=100.0).plain
    for part in ("failed", "rows/s", "ETA", "cached", "429s", "$12.3456", "tokens", "in flight", "skipped",
                 "fallback", "2 batches running"):
        assert part in wide, wide
    narrow = progress_line(BUSY, 80, base=0, now=100.0).plain
    assert len(narrow) <= 79 and "1,203 failed" in narrow and "rows/s" in narrow and "ETA" in narrow
    assert "in flight" not in narrow
    tiny = progress_line(BUSY, 30, base=0, now=100.0).plain
    assert len(tiny) <= 29 and tiny.endswith(" 13,580/17,842")


def test_rate_and_eta_count_only_this_runs_rows():
    from llmap.observe.progress import progress_line

    t = Tally(total=100, done=60, started=0.0)
    line = progress_line(t, 120, base=50, now=10.0).plain  # 10 rows in 10 s; 40 left
    assert "1.0 rows/s" in line and "ETA 0:00:40" in line
