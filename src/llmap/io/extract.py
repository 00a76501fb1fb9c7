"""A document's bytes into text, page by page: PDF, HTML, image (OCR) and plain text.

- **PDF**: each page's text layer (pypdf); a page without one is rendered at
  :data:`OCR_DPI` (pypdfium2) and read by Tesseract (pytesseract). An
  encrypted PDF is opened with the empty password (what viewers do) or refused.
- **HTML**: the page's main text (trafilatura, favouring precision: menus,
  footers and sidebars are left out; recall is tried when precision finds nothing).
- **Image**: Tesseract OCR (Pillow reads PNG, JPEG, GIF, WebP, TIFF, BMP).
- **Text**: decoded (BOM, UTF-8, the ``charset`` the server named, else cp1252);
  form feeds split pages.

:func:`cut_to_tokens` joins the pages a prompt gets, cut to ``max_tokens``
keeping whole pages; :func:`sendable_image` prepares an image for an image part.

Every page is normalised the same way (:func:`normalize`): line ends unified,
ligatures and soft hyphens undone, runs of white space inside a line made one
space, lines trimmed, blank lines collapsed to one. Line breaks are kept: they
carry a table's rows.

The libraries are the ``documents`` extra (``pip install 'llmap[documents]'``)
and are imported when first needed; Tesseract is Debian's ``tesseract-ocr``.
Functions here raise :class:`ExtractError` with the cause in a few words; the
caller names the document.
"""

from __future__ import annotations

import importlib.util
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["CHARS_PER_TOKEN", "EXTRACTOR_VERSION", "OCR_DPI", "ExtractError", "Pages", "cut_to_tokens", "image_info",
           "missing_libraries", "normalize", "ocr_image", "read_html", "read_pdf", "read_text", "sendable_image",
           "sniff"]

#: Bumped when extraction changes what it returns, so stored texts are extracted again.
EXTRACTOR_VERSION = "1"
#: Pages without a text layer are rendered at this resolution for OCR (Tesseract's recommendation).
OCR_DPI = 300
#: The longest side of a page rendered for OCR, in pixels (a poster-sized page is scaled down to it).
OCR_MAX_SIDE = 12_000

#: Characters per token when cutting a document to ``max_tokens`` (the estimate's default ratio).
CHARS_PER_TOKEN = 4
#: The largest image sent as it is, in bytes (Anthropic takes 5 MB of base64 per image); larger ones are re-encoded.
MAX_IMAGE_BYTES = 3_750_000
#: The longest side an image is scaled to when it must be re-encoded, in pixels.
IMAGE_MAX_SIDE = 2048
_SENDABLE = ("image/png", "image/jpeg", "image/gif", "image/webp")

#: The Python modules each kind needs (import name, PyPI name).
LIBRARIES: dict[str, list[tuple[str, str]]] = {
    "pdf": [("pypdf", "pypdf"), ("pypdfium2", "pypdfium2"), ("pytesseract", "pytesseract"), ("PIL", "Pillow")],
    "html": [("trafilatura", "trafilatura")],
    "image": [("PIL", "Pillow"), ("pytesseract", "pytesseract")],
    "text": [],
}
_LIGATURES = str.maketrans({"\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl",
                            "\ufb05": "st", "\ufb06": "st", "\u00ad": None, "\x00": None})
_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"),
                (b"GIF89a", "image/gif"), (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff"), (b"BM", "image/bmp"))
_HTML_START = re.compile(rb"^\s*(<!--.*?-->\s*)*<(!doctype\s+html|html|head|body|meta|title)\b", re.I | re.S)
_HTML_NAMES = (".html", ".htm", ".xhtml")
_IMAGE_NAMES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".tif", ".tiff", ".bmp")


class ExtractError(Exception):
    """The bytes cannot be read as the kind asked for; the message is the cause, in a few words."""


@dataclass(frozen=True, slots=True)
class Pages:
    """Text extracted from a document.

    Attributes:
        pages: each page's normalised text, in order (fewer than ``total`` when extraction stopped at a budget).
        total: the document's pages.
        ocr: how many of ``pages`` were read by OCR.
    """

    pages: tuple[str, ...]
    total: int
    ocr: int = 0


def missing_libraries(kind: str) -> list[str]:
    """The PyPI names of the libraries ``kind`` (``"auto"``: every kind) needs and this Python lacks."""
    kinds = list(LIBRARIES) if kind == "auto" else [kind]
    out = []
    for k in kinds:
        for module, package in LIBRARIES[k]:
            if importlib.util.find_spec(module) is None and package not in out:
                out.append(package)
    return out


def normalize(text: str) -> str:
    """Normalise extracted text (see the module docstring): what every kind of document returns."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").translate(_LIGATURES)
    out: list[str] = []
    for line in text.split("\n"):
        line = " ".join(line.split())
        if line or (out and out[-1]):
            out.append(line)
    while out and not out[-1]:
        out.pop()
    return "\n".join(out)


def sniff(data: bytes, *, name: str = "", content_type: str | None = None) -> str:
    """The kind of a document, from its first bytes, then its ``Content-Type``, then its name.

    Returns:
        ``"pdf"``, ``"image"``, ``"html"`` or ``"text"``.
    """
    head = data[:1024]
    if head.lstrip()[:5] == b"%PDF-":
        return "pdf"
    if _image_type(head) is not None:
        return "image"
    ctype = (content_type or "").split(";", 1)[0].strip().lower()
    low = name.lower().split("?", 1)[0]
    if _HTML_START.match(head) or ctype in ("text/html", "application/xhtml+xml") or low.endswith(_HTML_NAMES):
        return "html"
    if ctype == "application/pdf" or low.endswith(".pdf"):
        return "pdf"
    if ctype.startswith("image/") or low.endswith(_IMAGE_NAMES):
        return "image"
    return "text"


def _image_type(head: bytes) -> str | None:
    for magic, media in _IMAGE_MAGIC:
        if head.startswith(magic):
            return media
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


# -- PDF -----------------------------------------------------------------------------------------
def read_pdf(data: bytes, *, lang: str = "eng", budget_chars: int | None = None) -> Pages:
    """A PDF's pages: the text layer, OCR for pages without one.

    Args:
        data: the PDF's bytes.
        lang: Tesseract's language(s) for OCR.
        budget_chars: stop after the page that takes the text past this many characters (the rest
            would be cut anyway); None reads every page.

    Raises:
        ExtractError: not a PDF, corrupt, encrypted with a password, or OCR needed and not possible.
    """
    import pypdf
    from pypdf.errors import DependencyError, PdfReadError

    if data.lstrip()[:5] != b"%PDF-":
        raise ExtractError(f"not a PDF (it starts with {_start(data)})")
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise ExtractError("the PDF is encrypted with a password")
        total = len(reader.pages)
    except DependencyError:
        raise ExtractError("the PDF is encrypted with AES; reading it needs `pip install cryptography`") from None
    except ExtractError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, IndexError, OSError) as exc:
        raise ExtractError(f"corrupt PDF ({type(exc).__name__}: {str(exc)[:120]})") from None
    pages: list[str] = []
    ocr = 0
    used = 0
    rendered = None
    for i in range(total):
        try:
            text = normalize(reader.pages[i].extract_text() or "")
        except Exception as exc:  # pypdf raises many kinds on broken content streams
            raise ExtractError(f"corrupt PDF: page {i + 1} cannot be read ({type(exc).__name__})") from None
        if not text:  # no text layer: a scan
            if rendered is None:
                rendered = _PdfRenderer(data)
            text = normalize(ocr_image_object(rendered.page(i), lang))
            ocr += 1
        pages.append(text)
        used += len(text)
        if budget_chars is not None and used > budget_chars:
            break
    if rendered is not None:
        rendered.close()
    return Pages(tuple(pages), total, ocr)


class _PdfRenderer:
    """pypdfium2 over one PDF, rendering pages for OCR."""

    def __init__(self, data: bytes) -> None:
        import pypdfium2

        try:
            self._doc = pypdfium2.PdfDocument(data)
        except pypdfium2.PdfiumError as exc:
            raise ExtractError(f"a page has no text layer and cannot be rendered for OCR ({exc})") from None

    def page(self, i: int):  # -> PIL.Image.Image
        page = self._doc[i]
        try:
            width, height = page.get_size()
            scale = min(OCR_DPI / 72, OCR_MAX_SIDE / max(width, height, 1))
            return page.render(scale=scale, grayscale=True).to_pil()
        finally:
            page.close()

    def close(self) -> None:
        self._doc.close()


# -- images and OCR ------------------------------------------------------------------------------
def ocr_image_object(image, lang: str) -> str:
    """Tesseract's text for a Pillow image.

    Raises:
        ExtractError: Tesseract is not installed, lacks ``lang``, or failed.
    """
    import pytesseract

    try:
        return pytesseract.image_to_string(image, lang=lang)
    except pytesseract.TesseractNotFoundError:
        raise ExtractError("OCR needs Tesseract, which is not installed (Debian: apt-get install tesseract-ocr)") \
            from None
    except pytesseract.TesseractError as exc:
        msg = str(exc.message or exc).strip().splitlines()
        hint = f"; install its language data (Debian: tesseract-ocr-{lang.split('+')[0]})" if "lang" in str(exc) else ""
        raise ExtractError(f"OCR failed ({msg[0] if msg else 'Tesseract error'}){hint}") from None


def ocr_image(data: bytes, *, lang: str = "eng") -> Pages:
    """An image's text, by OCR.

    Raises:
        ExtractError: not an image Pillow reads, or OCR failed.
    """
    image = _open_image(data)
    try:
        return Pages((normalize(ocr_image_object(image.convert("L"), lang)),), 1, 1)
    finally:
        image.close()


def image_info(data: bytes) -> tuple[str, int, int]:
    """An image's media type, width and height in pixels (from its header).

    Raises:
        ExtractError: not an image Pillow reads.
    """
    image = _open_image(data)
    try:
        media = _image_type(data[:16]) or f"image/{(image.format or 'png').lower()}"
        return media, image.width, image.height
    finally:
        image.close()


def _open_image(data: bytes):  # -> PIL.Image.Image
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ExtractError(f"not an image Pillow can read (it starts with {_start(data)}; "
                           f"{type(exc).__name__})") from None
    return image


def sendable_image(data: bytes) -> tuple[bytes, str, int, int]:
    """An image as an image part takes it: ``(bytes, media type, width, height)``.

    PNG, JPEG, GIF and WebP up to :data:`MAX_IMAGE_BYTES` go as they are; anything else (TIFF, BMP, a
    larger file) is re-encoded as JPEG (PNG when it has transparency), its longest side at most
    :data:`IMAGE_MAX_SIDE` pixels.

    Raises:
        ExtractError: not an image Pillow reads.
    """
    media, width, height = image_info(data)
    if media in _SENDABLE and len(data) <= MAX_IMAGE_BYTES:
        return data, media, width, height
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.thumbnail((IMAGE_MAX_SIDE, IMAGE_MAX_SIDE))
        out = io.BytesIO()
        if image.mode in ("RGBA", "LA", "P"):
            image.save(out, format="PNG", optimize=True)
            media = "image/png"
        else:
            image.convert("RGB").save(out, format="JPEG", quality=85)
            media = "image/jpeg"
        return out.getvalue(), media, image.width, image.height


# -- HTML and text -------------------------------------------------------------------------------
def read_html(data: bytes) -> Pages:
    """An HTML page's main text (one page).

    Raises:
        ExtractError: the page has no main text.
    """
    import trafilatura

    text = None
    for options in ({"favor_precision": True}, {"favor_recall": True}):
        text = trafilatura.extract(data, include_comments=False, include_tables=True, include_images=False,
                                   deduplicate=False, **options)
        if text and text.strip():
            break
    text = normalize(text or "")
    if not text:
        raise ExtractError("the HTML page has no main text")
    return Pages((text,), 1, 0)


def read_text(data: bytes, *, content_type: str | None = None) -> Pages:
    """Plain text, decoded; form feeds split pages.

    Raises:
        ExtractError: the bytes are binary (NUL bytes and no UTF-16 mark).
    """
    text = decode(data, content_type=content_type)
    pages = tuple(normalize(p) for p in text.split("\f"))
    return Pages(pages or ("",), max(1, len(pages)), 0)


def decode(data: bytes, *, content_type: str | None = None) -> str:
    """Text from bytes: BOM, UTF-8, the ``charset`` of ``content_type``, else cp1252 (then latin-1).

    Raises:
        ExtractError: binary data.
    """
    for bom, codec in ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16")):
        if data.startswith(bom):
            return data.decode(codec, errors="replace")
    if b"\x00" in data[:8192]:
        raise ExtractError(f"not text (binary data; it starts with {_start(data)})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    charset = re.search(r"charset=[\"']?([\w.:-]+)", content_type or "", re.I)
    for codec in ([charset.group(1)] if charset else []) + ["cp1252"]:
        try:
            return data.decode(codec)
        except (LookupError, UnicodeDecodeError):
            continue
    return data.decode("latin-1")


def _start(data: bytes) -> str:
    """The first bytes, for an error message: ``'<!DOCTYPE html>...'``."""
    head = data[:16]
    return repr(head.decode("latin-1")) if head else "nothing: the file is empty"


def cut_to_tokens(pages: Sequence[str], total: int, max_tokens: int) -> str:
    """Pages joined by blank lines, cut to ``max_tokens`` keeping whole pages, with a note when cut.

    Args:
        pages: the pages extracted (maybe fewer than ``total``).
        total: the document's pages.
        max_tokens: the most tokens kept, counted as characters / :data:`CHARS_PER_TOKEN`.

    Returns:
        The text. A one-page document is cut at paragraph (blank line) boundaries instead; when
        even the first unit is too long, it is cut at the last line break (or space) that fits.
    """
    budget = max_tokens * CHARS_PER_TOKEN
    units, unit = list(pages), "pages"
    if total <= 1 and len(units) == 1:
        units, unit = [u for u in units[0].split("\n\n")], "paragraphs"
        total = len(units)
    whole = "\n\n".join(units)
    if len(whole) <= budget and len(units) >= total:
        return whole
    kept: list[str] = []
    used = 0
    for u in units:
        if used + len(u) > budget:
            break
        kept.append(u)
        used += len(u) + 2
    if kept:
        text, what = "\n\n".join(kept), f"{unit} 1-{len(kept)} of {total} kept"
    else:
        first = units[0][:budget]
        at = first.rfind("\n")
        if at <= budget // 2:  # no line break in the second half: a space will do
            at = first.rfind(" ")
        text = first[:at] if at > budget // 2 else first
        what = f"{unit[:-1]} 1 of {total} cut short"
    return f"{text}\n\n[llmap: document cut to max_tokens = {max_tokens}: {what}]"


#: What reads each kind: ``(data, lang, budget_chars, content_type) -> Pages``.
READERS: dict[str, Callable[[bytes, str, int | None, str | None], Pages]] = {
    "pdf": lambda data, lang, budget, ctype: read_pdf(data, lang=lang, budget_chars=budget),
    "html": lambda data, lang, budget, ctype: read_html(data),
    "image": lambda data, lang, budget, ctype: ocr_image(data, lang=lang),
    "text": lambda data, lang, budget, ctype: read_text(data, content_type=ctype),
}
