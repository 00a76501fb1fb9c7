"""Deprecated: progress reporting moved to :mod:`llmap.observe.progress`.

``llmap.report`` held the progress bars until 0.2; ``llmap report`` (the
command) lives in :mod:`llmap.observe.report`. This module re-exports the old
names for one release and will then be removed.
"""

from llmap.observe.progress import (
    CountingProgress,
    MessagesOnly,
    NullProgress,
    Progress,
    RichProgress,
    Tally,
)

__all__ = ["CountingProgress", "MessagesOnly", "NullProgress", "Progress", "RichProgress", "Tally"]
