"""Durations people write: ``30d``, ``12h``, ``90m``, ``1w``, ``1d12h`` (``[cache] ttl``, ``--older-than``)."""

from __future__ import annotations

import re

from llmap.control.headers import parse_duration as parse_go_duration

__all__ = ["parse_duration"]

_WEEKS = re.compile(r"(\d+(?:\.\d*)?|\.\d+)w")
_DURATION_HELP = "write a number and a unit (s, m, h, d or w), e.g. 45s, 90m, 12h, 30d, 1w or 1d12h"


def parse_duration(text: str) -> float:
    """Parse a command-line duration such as ``30d``, ``12h``, ``90m``, ``45s``, ``1w`` or ``1d12h``.

    Parts may be combined (``1w2d``, ``1h30m``) and may be decimal (``1.5h``).
    Units: ``w`` weeks, ``d`` days, ``h`` hours, ``m`` minutes, ``s`` seconds
    (and ``ms``). The parsing is :func:`llmap.control.headers.parse_duration`'s,
    plus weeks; unlike it, a bare number is refused because ``30`` could mean
    seconds or days.

    Args:
        text: the duration; case and surrounding white space are ignored.

    Returns:
        Seconds (>= 0).

    Raises:
        ValueError: the text is not such a duration; the message says how to write one.
    """
    s = text.strip().lower()
    try:
        float(s)
    except ValueError:
        pass
    else:
        raise ValueError(f"duration {text!r} has no unit: {_DURATION_HELP}")
    s = _WEEKS.sub(lambda m: f"{float(m.group(1)) * 7:f}d", s)
    try:
        return parse_go_duration(s)
    except ValueError:
        raise ValueError(f"invalid duration {text!r}: {_DURATION_HELP}") from None
