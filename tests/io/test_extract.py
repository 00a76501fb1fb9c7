"""Extraction: PDF text layers, OCR of scanned pages and images, HTML main text, plain text, normalisation."""

from __future__ import annotations

import io
import shutil

import pytest

from _documents import html_page, pdf_with_text, png, scanned_pdf
from llmap.io import extract as X


def needs_ocr(test):
    """Marker ``ocr`` (CI must run it) and a skip without Tesseract or the documents extra."""
    skip = pytest.mark.skipif(shutil.which("tesseract") is None or bool(X.missing_libraries("pdf")),
                              reason="needs Tesseract (apt-get install tesseract-ocr) and the documents extra")
    return pytest.mark.ocr(skip(test))


def test_normalize_keeps_lines_and_collapses_the_rest() -> None:
    raw = "  Period 1\t 8:00   8:50 \r\nPeriod 2  8:55\u00a09:45\n\n\n\n\x0c\ufb01nal bell\u00ad\n  \n"
    assert X.normalize(raw) == "Period 1 8:00 8:50\nPeriod 2 8:55 9:45\n\nfinal bell"
    assert X.normalize("\n\n  \n") == ""


@pytest.mark.parametrize("data, name, ctype, kind", [
    (b"%PDF-1.7 ...", "x.bin", None, "pdf"),
    (b"\x89PNG\r\n\x1a\n....", "", None, "image"),
    (b"\xff\xd8\xff\xe0", "", None, "image"),
    (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "", None, "image"),
    (b"  <!DOCTYPE html><html>", "", None, "html"),
    (b"<!-- c --><html lang=en>", "", None, "html"),
    (b"plain words", "page", "text/html; charset=utf-8", "html"),
    (b"plain words", "a.HTM", None, "html"),
    (b"plain words", "notes.txt", None, "text"),
    (b"garbage", "scan.pdf", None, "pdf"),
    (b"garbage", "", "application/pdf", "pdf"),
    (b"garbage", "photo.jpeg?x=1", None, "image"),
])
def test_sniff_reads_bytes_then_type_then_name(data: bytes, name: str, ctype: str | None, kind: str) -> None:
    assert X.sniff(data, name=name, content_type=ctype) == kind


def test_a_pdf_text_layer_is_read_page_by_page() -> None:
    pdf = pdf_with_text([["Grades 1-3: 375 min", "Lunch (30 min) \\ recess"], ["Page two ÷ 2"]])
    got = X.read_pdf(pdf)
    assert got.pages == ("Grades 1-3: 375 min\nLunch (30 min) \\ recess", "Page two ÷ 2")
    assert got.total == 2 and got.ocr == 0


def test_pdf_reading_stops_once_past_the_budget() -> None:
    pdf = pdf_with_text([["a" * 100], ["b" * 100], ["c" * 100], ["d" * 100]])
    got = X.read_pdf(pdf, budget_chars=150)
    assert got.pages == ("a" * 100, "b" * 100) and got.total == 4


def test_bad_pdfs_say_why() -> None:
    with pytest.raises(X.ExtractError, match="not a PDF \\(it starts with '<html>"):
        X.read_pdf(b"<html>not a pdf</html>")
    with pytest.raises(X.ExtractError, match="corrupt PDF"):
        X.read_pdf(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> trailer garbage")


def test_an_encrypted_pdf_needs_its_password_unless_it_is_empty() -> None:
    import pypdf

    def encrypted(user: str, algorithm: str = "RC4-128") -> bytes:
        w = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(pdf_with_text([["secret schedule"]]))))
        w.encrypt(user_password=user, owner_password="owner", algorithm=algorithm)
        out = io.BytesIO()
        w.write(out)
        return out.getvalue()

    with pytest.raises(X.ExtractError, match="encrypted with a password"):
        X.read_pdf(encrypted("s3cret"))
    assert X.read_pdf(encrypted("")).pages == ("secret schedule",)  # what viewers open without asking
    assert X.read_pdf(encrypted("", "AES-256")).pages == ("secret schedule",)  # pypdf[crypto]
    with pytest.raises(X.ExtractError, match="encrypted with a password"):
        X.read_pdf(encrypted("s3cret", "AES-128"))


@needs_ocr
def test_a_scanned_page_is_read_by_ocr() -> None:
    got = X.read_pdf(scanned_pdf([["Start 8:05 AM, end 3:10 PM (425 min total)."]]))
    assert got.pages == ("Start 8:05 AM, end 3:10 PM (425 min total).",) and got.ocr == 1


@needs_ocr
def test_an_image_is_read_by_ocr_and_measured() -> None:
    data = png(["Lunch 35 min"])
    assert X.ocr_image(data).pages == ("Lunch 35 min",)
    media, width, height = X.image_info(data)
    assert media == "image/png" and width > 200 and height > 40
    with pytest.raises(X.ExtractError, match="not an image Pillow can read"):
        X.image_info(b"GIF89a-not-really")


@pytest.mark.skipif(bool(X.missing_libraries("html")), reason="needs trafilatura")
def test_html_main_text_leaves_the_site_chrome_out() -> None:
    text = "Elementary: 8:00 AM - 2:30 PM (390 min total). Assuming ~60 min lunch/recess = 330 min."
    assert X.read_html(html_page("Springfield & Co", text)).pages == (text,)
    with pytest.raises(X.ExtractError, match="no main text"):
        X.read_html(b"<html><head><title>t</title></head><body>  </body></html>")


def test_text_is_decoded_and_split_on_form_feeds() -> None:
    assert X.read_text("Ünïcode\fpage 2".encode()).pages == ("Ünïcode", "page 2")
    assert X.read_text("caf\xe9".encode("cp1252")).pages == ("café",)
    assert X.read_text("\ufeffbom".encode()).pages == ("bom",)
    assert X.read_text("hi".encode("utf-16")).pages == ("hi",)
    assert X.read_text("\u0436".encode("koi8-r"), content_type="text/plain; charset=koi8-r").pages == ("\u0436",)
    with pytest.raises(X.ExtractError, match="binary data"):
        X.read_text(b"\x00\x01\x02binary")


def test_missing_libraries_names_pypi_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "trafilatura" else real(name))
    assert X.missing_libraries("html") == ["trafilatura"]
    assert "trafilatura" in X.missing_libraries("auto") and X.missing_libraries("text") == []
