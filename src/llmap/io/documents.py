"""Document columns: a column that holds a path or URL, read into text on the row's path.

``[input.documents] schedule = { kind = "pdf", max_tokens = 4000 }`` makes the
column ``schedule`` a path (relative to the job file's folder) or an
``http(s)://`` URL; the template reads ``{{ schedule }}`` and gets the text.

**When.** Text is extracted (and URLs fetched) on the row's path, just before
the row is rendered (:meth:`Documents.resolve_data`), never for rows already
done. What is extracted is kept by content
(:class:`~llmap.store.documents.DocumentStore`), so a document is read (and
OCR'd) once, whichever job, row or name it comes under.

**Content, not names.** A row's input hash (what makes a done row stale) and
the cache key (the rendered request) hold each document's SHA-256, not its
name: a changed file is asked again, a renamed identical file is not.

- A local file is hashed when the job is planned (:meth:`Documents.identity`;
  the hash is remembered by path, size and mtime, so a rerun hashes only files
  that changed).
- A URL is not fetched when planning. Its identity is the SHA-256 of its stored
  body while that is younger than ``[fetch] max_age``, else the URL itself
  (``url:...``): a URL never fetched, or due to be checked again. Such a row
  is planned pending; on its path the body is fetched (or revalidated with a
  conditional request: a ``304`` costs no download), and the row's input hash
  is recorded with the body's SHA-256 once it settles. An unchanged page then
  renders the same request, which the response cache answers: no model request.

**Cut.** A document longer than its ``max_tokens`` (characters / 4) is cut at
a page boundary (a paragraph's, for a one-page document), and a note at the end
says what was kept: ``[llmap: document cut to max_tokens = 4000: pages 1-3 of 7 kept]``
(:func:`~llmap.io.extract.cut_to_tokens`).

**Images.** A document of kind ``image`` (or ``auto`` that turns out an image)
goes to the model as an image part when every ``[[model]]`` takes images
(``[model] images``) and rows are not packed; otherwise it is read by OCR.

**Safety.** Paths resolve inside the job's folder or an ``[input]
document_dirs`` folder (symbolic links followed first); anything else, ``../``
out of them included, is refused for that row. URLs go through
:mod:`llmap.io.fetch` (http and https only; no private addresses unless
``[fetch] allow_private``).

**Failures.** A document that cannot be read fails its row alone with one
:class:`~llmap.errors.DocumentError` line naming the path or URL, the cause and
the column; the run goes on. :meth:`Documents.preflight` reads the first rows'
documents before any request: a column where none of them can be read is a
:class:`~llmap.errors.SpecError` (exit 2).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmap import errors as E
from llmap.io import extract as X
from llmap.io.fetch import Fetcher, FetchStats
from llmap.io.sources import Source
from llmap.prompt.parts import IMAGES_KEY, image_marker
from llmap.spec import JobSpec
from llmap.spec.documents import DocumentSpec
from llmap.store.cache import default_cache_dir
from llmap.store.documents import FILE_NAME as STORE_FILE
from llmap.store.documents import DocumentStore, TextEntry
from llmap.store.fingerprint import input_hash

__all__ = ["PREFLIGHT_ROWS", "RESOLVED_KEY", "DocumentStats", "Documents", "Resolved", "is_url"]

#: Documents per column read by the preflight.
PREFLIGHT_ROWS = 5
#: The key a resolved row's data carries: column -> the document's identity.
RESOLVED_KEY = "_llmap_documents"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(value: str) -> bool:
    """Whether a document cell is a URL (``scheme://...``) rather than a path."""
    return bool(_URL.match(value))


@dataclass
class DocumentStats:
    """What a run's documents cost: ``files`` read, ``extracted`` (documents read into text, not from the
    store), ``ocr_pages``, ``texts_stored`` (texts taken from the store), ``images`` sent as image parts,
    ``failed`` documents, and the fetcher's figures (``fetch``)."""

    files: int = 0
    extracted: int = 0
    ocr_pages: int = 0
    texts_stored: int = 0
    images: int = 0
    failed: int = 0
    fetch: FetchStats | None = None


@dataclass(frozen=True, slots=True)
class Resolved:
    """One document cell, read.

    Attributes:
        text: what the template gets (for an image sent as an image part, a marker the renderer replaces).
        identity: ``"sha256:<hex>"`` of the document's bytes.
        kind: the kind it was read as.
        image: ``{"media_type", "data" (base64), "width", "height"}`` for an image part, else None.
    """

    text: str
    identity: str
    kind: str
    image: dict[str, Any] | None = None


def _json_roundtrip(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` as the ledger's JSON gives them back (dates as text, ...): what a resolved row hashes."""
    return json.loads(json.dumps(values, ensure_ascii=False, default=str))


class Documents:
    """A job's document columns (see the module docstring).

    Args:
        spec: the job (``[input.documents]``, ``[input] document_dirs``, ``[fetch]``, the models).
        fingerprint: the job's request fingerprint (for the input hash of a resolved row).
        variables: the template variables (the inputs hashed).
        store: the document store; default the shared one, opened when first needed.
        fetcher: fetches URLs; default a :class:`~llmap.io.fetch.Fetcher`, made when first needed.
        readonly: open the store read-only and write nothing (``llmap estimate``).
    """

    def __init__(self, spec: JobSpec, *, fingerprint: str, variables: Sequence[str],
                 store: DocumentStore | None = None, fetcher: Fetcher | None = None, readonly: bool = False) -> None:
        self.columns: dict[str, DocumentSpec] = dict(spec.input.documents)
        self.base_dir = spec.base_dir.resolve()
        self.roots = [self.base_dir] + [spec.resolve(d).resolve() for d in spec.input.document_dirs]
        self.fetch_spec = spec.fetch
        #: image documents go to the model as image parts (else OCR)
        self.images = all(m.takes_images for m in spec.models) and spec.prompt.pack == 1
        self.fingerprint = fingerprint.encode()
        self.variables = tuple(variables)
        self.readonly = readonly
        self.stats = DocumentStats()
        self._store = store
        self._fetcher = fetcher
        self._cpu: asyncio.Semaphore | None = None
        self._extracting: dict[tuple[str, str], asyncio.Task[TextEntry]] = {}

    # -- resources --------------------------------------------------------------------------
    @property
    def store(self) -> DocumentStore:
        """The document store, opened on first use."""
        if self._store is None:
            path = default_cache_dir() / STORE_FILE
            if not self.readonly:
                self._store = DocumentStore(path)
            else:  # an estimate writes nothing: no store yet means nothing known yet
                self._store = DocumentStore(path, readonly=True) if path.is_file() else _EmptyStore()
        return self._store

    @property
    def fetcher(self) -> Fetcher:
        """The URL fetcher, made on first use (inside the running event loop)."""
        if self._fetcher is None:
            self._fetcher = Fetcher(self.fetch_spec, self.store)
            self.stats.fetch = self._fetcher.stats
        return self._fetcher

    def close(self) -> None:
        """Close the store (the fetcher's connections close with :meth:`aclose`)."""
        if self._store is not None:
            self._store.close()
            self._store = None

    async def aclose(self) -> None:
        """Close the fetcher's connections and the store."""
        for task in self._extracting.values():
            task.cancel()
        if self._fetcher is not None:
            await self._fetcher.aclose()
            self._fetcher = None
        self.close()

    # -- planning: identities ---------------------------------------------------------------------
    def identities(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """A row's template inputs as its input hash sees them: each document cell is replaced by its
        :meth:`identity`, and the other values are what the ledger's JSON gives back."""
        out = _json_roundtrip(inputs)
        for column in self.columns:
            if column in out:
                out[column] = self.identity(column, out[column])
        return out

    def identity(self, column: str, value: Any) -> Any:
        """What a document cell contributes to the input hash when the job is planned.

        Returns:
            ``None`` or ``""`` as given (an empty cell); ``"sha256:<hex>"`` of a local file (hashed now,
            remembered by path, size and mtime) or of a URL's stored body still fresh; ``"url:<url>"``
            for a URL to fetch; ``"unreadable:<value>"`` for a path that cannot be read now (its row
            fails on its path, and the file's appearance changes the hash).
        """
        if value is None or value == "":
            return value
        if not isinstance(value, str):
            return f"unreadable:{value!r}"
        if is_url(value):
            entry = self.store.fetched(value)
            if entry is not None and time.time() - entry.checked_at < self.fetch_spec.max_age_s:
                return f"sha256:{entry.sha256}"
            return f"url:{value}"
        try:
            path = self.locate(value)
            st = path.stat()
            known = self.store.file_hash(str(path), st.st_size, st.st_mtime_ns)
            if known is None:
                with open(path, "rb") as f:
                    known = hashlib.file_digest(f, "sha256").hexdigest()
                self.store.put_file_hash(str(path), st.st_size, st.st_mtime_ns, known)
            return f"sha256:{known}"
        except (E.DocumentError, OSError):
            return f"unreadable:{value}"

    def locate(self, value: str) -> Path:
        """A document path, resolved against the job's folder and checked against the allowed folders.

        Raises:
            DocumentError: the path leads outside the job's folder and ``[input] document_dirs``.
        """
        try:
            p = Path(value).expanduser()
            path = (p if p.is_absolute() else self.base_dir / p).resolve()
        except (OSError, ValueError, RuntimeError) as exc:  # a NUL byte, a symbolic link loop, no home folder
            raise E.DocumentError(f"{value!r}: not a usable path ({exc})", source=value) from None
        if not any(path == root or path.is_relative_to(root) for root in self.roots):
            dirs = ", ".join(str(r) for r in self.roots[1:]) or "none"
            raise E.DocumentError(
                f"{value}: outside the folders documents may come from (the job's folder {self.base_dir}; "
                f"[input] document_dirs: {dirs}); add its folder to [input] document_dirs", source=value)
        return path

    # -- the row's path: resolution ----------------------------------------------------------------
    async def resolve_data(self, data: str) -> tuple[str, str | None]:
        """Read a ledger row's documents into its data.

        Args:
            data: the row's ledger data (JSON text of column -> value).

        Returns:
            ``(data, input_hash)``: the row's data with each document cell replaced by its text (and
            images under :data:`~llmap.prompt.parts.IMAGES_KEY`), and the row's input hash over the
            documents' content; ``(data, None)`` for data already resolved.

        Raises:
            DocumentError: a document cannot be read (the first, when several cannot).
        """
        row = json.loads(data)
        if RESOLVED_KEY in row:
            return data, None
        cells = [(c, row[c]) for c in self.columns if row.get(c) not in (None, "")]
        got = await asyncio.gather(*(self.resolve_cell(c, v) for c, v in cells), return_exceptions=True)
        for res in got:
            if isinstance(res, BaseException):
                raise res
        idents: dict[str, str] = {}
        images: dict[str, Any] = {}
        for (column, _), res in zip(cells, got, strict=True):
            row[column] = res.text
            idents[column] = res.identity
            if res.image is not None:
                images[column] = res.image
        inputs = _json_roundtrip({v: row.get(v) for v in self.variables if v not in idents})
        inputs.update({c: idents[c] for c in idents if c in self.variables})
        row[RESOLVED_KEY] = idents
        if images:
            row[IMAGES_KEY] = images
        return json.dumps(row, ensure_ascii=False), input_hash(self.fingerprint, inputs)

    async def resolve_cell(self, column: str, value: Any) -> Resolved:
        """Read one document cell.

        Raises:
            DocumentError: it cannot be read; the message names the path or URL, the cause and the column.
        """
        try:
            return await self._resolve(column, value)
        except E.DocumentError as exc:
            self.stats.failed += 1
            raise E.DocumentError(f"{exc} (column {column!r})", source=exc.source or str(value), column=column,
                                  transient=exc.transient) from None

    async def _resolve(self, column: str, value: Any) -> Resolved:
        spec = self.columns[column]
        if not isinstance(value, str):
            raise E.DocumentError(f"{value!r}: not a path or URL", source=str(value))
        if is_url(value):
            got = await self.fetcher.fetch(value)
            data, name, ctype, sha = got.body, got.final_url, got.content_type, got.sha256
        else:
            path = self.locate(value)
            data = await asyncio.to_thread(_read_file, path, value)
            self.stats.files += 1
            name, ctype, sha = path.name, None, hashlib.sha256(data).hexdigest()
        if not data:
            raise E.DocumentError(f"{value}: the document is empty", source=value)
        kind = spec.kind if spec.kind != "auto" else X.sniff(data, name=name, content_type=ctype)
        try:
            if kind == "image" and self.images:
                return Resolved(image_marker(column), f"sha256:{sha}", kind, await self._image(data))
            entry = await self._text(data, sha, kind, spec, ctype)
        except X.ExtractError as exc:
            raise E.DocumentError(f"{value}: {exc}", source=value) from None
        text = X.cut_to_tokens(entry.pages, entry.total_pages, spec.max_tokens)
        return Resolved(text, f"sha256:{sha}", kind)

    async def _text(self, data: bytes, sha: str, kind: str, spec: DocumentSpec, ctype: str | None) -> TextEntry:
        """The document's pages: from the store, or extracted (once, however many rows ask at once)."""
        recipe = _recipe(kind, spec)
        stored = self.store.text(sha, recipe)
        if _enough(stored, spec):
            self.stats.texts_stored += 1
            return stored
        key = (sha, recipe)
        task = self._extracting.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._extract(data, sha, recipe, kind, spec, ctype))
            self._extracting[key] = task
            task.add_done_callback(lambda _t: self._extracting.pop(key, None))
        return await asyncio.shield(task)

    async def _extract(self, data: bytes, sha: str, recipe: str, kind: str, spec: DocumentSpec,
                       ctype: str | None) -> TextEntry:
        if self._cpu is None:
            self._cpu = asyncio.Semaphore(max(1, os.cpu_count() or 1))
        async with self._cpu:  # extraction and OCR are CPU work: one per core
            pages = await asyncio.to_thread(X.READERS[kind], data, spec.ocr_lang,
                                            spec.max_tokens * X.CHARS_PER_TOKEN, ctype)
        if not any(p.strip() for p in pages.pages):
            what = f" in {pages.total} page{'s' if pages.total != 1 else ''}" if kind == "pdf" else ""
            ocr = " (OCR included)" if pages.ocr else ""
            raise X.ExtractError(f"no text found{what}{ocr}")
        entry = TextEntry(pages.pages, pages.total, pages.ocr)
        self.stats.extracted += 1
        self.stats.ocr_pages += pages.ocr
        self.store.put_text(sha, recipe, entry)
        return entry

    async def _image(self, data: bytes) -> dict[str, Any]:
        """An image as an image part: sent as it is when its format and size allow, else re-encoded."""
        data, media, width, height = await asyncio.to_thread(X.sendable_image, data)
        self.stats.images += 1
        return {"media_type": media, "data": base64.b64encode(data).decode("ascii"), "width": width,
                "height": height}

    # -- what is known already (``llmap estimate``) -------------------------------------------------
    def known(self, column: str, value: Any) -> tuple[str | None, tuple[int, int] | None]:
        """What a cell would send, from what is already stored: no fetch, no extraction, nothing written.

        Returns:
            ``(text, None)`` when its text is stored (cut to ``max_tokens``), ``("", (width, height))`` for an
            image that goes as an image part, ``(None, None)`` when it was never read (or cannot be).
        """
        spec = self.columns[column]
        if not isinstance(value, str) or not value:
            return "", None
        try:
            if is_url(value):
                entry = self.store.fetched(value)
                data = self.store.body(entry.sha256) if entry is not None else None
                if entry is None or data is None:
                    return None, None
                name, ctype, sha = entry.final_url, entry.content_type, entry.sha256
            else:
                data = self.locate(value).read_bytes()
                name, ctype, sha = value, None, hashlib.sha256(data).hexdigest()
            kind = spec.kind if spec.kind != "auto" else X.sniff(data, name=name, content_type=ctype)
            if kind == "image" and self.images:
                return "", X.image_info(data)[1:]
        except (OSError, E.DocumentError, X.ExtractError):
            return None, None
        entry = self.store.text(sha, _recipe(kind, spec))
        if not _enough(entry, spec):
            return None, None
        return X.cut_to_tokens(entry.pages, entry.total_pages, spec.max_tokens), None

    # -- preflight ------------------------------------------------------------------------------------
    async def preflight(self, source: Source, *, rows: int = PREFLIGHT_ROWS) -> None:
        """Read the first ``rows`` non-empty documents of each column, before any request.

        Raises:
            SpecError: a column where none of them can be read (the message gives the first error).
        """
        for column in self.columns:
            values: list[Any] = []
            for batch in source.batches([column], batch_rows=256):
                values += [v for v in batch.column(0).to_pylist() if v not in (None, "")][: rows - len(values)]
                if len(values) >= rows:
                    break
            if not values:
                continue
            got = await asyncio.gather(*(self.resolve_cell(column, v) for v in values), return_exceptions=True)
            errors = [g for g in got if isinstance(g, BaseException)]
            for g in errors:
                if not isinstance(g, E.DocumentError):
                    raise g
            if len(errors) == len(values):
                raise E.SpecError(
                    f"[input.documents] {column!r}: none of the first {len(values)} documents can be read (first: "
                    f"{errors[0]}); the column must hold paths (relative to {self.base_dir}) or http(s) URLs")


def _recipe(kind: str, spec: DocumentSpec) -> str:
    """How a text was extracted: the kind read, the OCR language, the extractor's version."""
    return f"{kind}|{spec.ocr_lang}|{X.EXTRACTOR_VERSION}"


def _enough(entry: TextEntry | None, spec: DocumentSpec) -> bool:
    """Whether a stored text serves ``spec``: every page, or more than its ``max_tokens`` hold."""
    return entry is not None and (entry.complete or sum(map(len, entry.pages)) > spec.max_tokens * X.CHARS_PER_TOKEN)


def _read_file(path: Path, value: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise E.DocumentError(f"{value}: no such file ({path})", source=value) from None
    except IsADirectoryError:
        raise E.DocumentError(f"{value}: is a folder, not a file", source=value) from None
    except PermissionError:
        raise E.DocumentError(f"{value}: permission denied ({path})", source=value) from None
    except OSError as exc:
        raise E.DocumentError(f"{value}: cannot be read ({exc.strerror or exc})", source=value) from None


class _EmptyStore:
    """A store with nothing in it (``llmap estimate`` before any document was read)."""

    readonly = True

    def file_hash(self, path: str, size: int, mtime_ns: int) -> None:
        return None

    def put_file_hash(self, *args: Any) -> None:
        return None

    def fetched(self, url: str) -> None:
        return None

    def body(self, sha256: str) -> None:
        return None

    def text(self, sha256: str, recipe: str) -> None:
        return None

    def close(self) -> None:
        return None
