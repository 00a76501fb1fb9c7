"""What each server took last time: one small JSON file in the cache folder.

``structured = "auto"`` finds the dialect a server takes by trying; the
result is remembered per (base URL, model) in ``dialects.json`` beside the
response cache (``$LLMAP_CACHE_DIR``), so the next run starts right and sends
no refused request. A remembered shape that a server later refuses is
stepped past again and the new one remembered.

The file is tiny and written rarely (when a run learns something): each
write replaces it atomically (a temp file renamed into place). Two runs
writing at once keep the last writer's view of the file; each run only adds
its own (base URL, model) entry, so at worst an entry is learned again.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from llmap.store.cache import default_cache_dir

__all__ = ["DialectMemory"]

#: The file's name inside the cache folder.
FILE_NAME = "dialects.json"
#: Most (base URL, model) entries kept; the least recently learned go first.
MAX_ENTRIES = 500


class DialectMemory:
    """Remembered request shapes, keyed by base URL and model name.

    Args:
        path: the JSON file; default ``default_cache_dir() / "dialects.json"``.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path if path is not None else default_cache_dir() / FILE_NAME

    @staticmethod
    def _key(base_url: str, model: str) -> str:
        return f"{base_url.rstrip('/')} {model}"

    def _read(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def get(self, base_url: str, model: str) -> dict[str, Any] | None:
        """What was remembered for this server and model, or None (also when the file is unreadable)."""
        rec = self._read().get(self._key(base_url, model))
        return rec if isinstance(rec, dict) else None

    def put(self, base_url: str, model: str, record: dict[str, Any]) -> None:
        """Remember ``record`` for this server and model. Never raises: a cache that cannot be
        written only costs the next run a refused request or two."""
        doc = self._read()
        doc.pop(self._key(base_url, model), None)
        doc[self._key(base_url, model)] = {**record, "at": time.strftime("%Y-%m-%d %H:%M:%S")}
        while len(doc) > MAX_ENTRIES:  # oldest first (insertion order): simulators on ephemeral ports add up
            doc.pop(next(iter(doc)))
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".dialects-", suffix=".json")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=1)
            os.replace(tmp, self.path)
            tmp = None
        except OSError:
            pass
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
