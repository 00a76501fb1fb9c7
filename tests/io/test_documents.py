"""Document columns: cutting, where paths may lead, content identity, and whole jobs whose bad documents fail
alone."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("pypdf")

from _documents import Page, PageServer, pdf_with_text  # noqa: E402
from _support import LLMAP, chat_requests  # noqa: E402
from llmap import Job  # noqa: E402
from llmap.errors import DocumentError, SpecError  # noqa: E402
from llmap.io.documents import Documents, is_url
from llmap.io.extract import cut_to_tokens  # noqa: E402
from llmap.plan import load_spec  # noqa: E402
from llmap.sim import Simulator  # noqa: E402


# -- cutting ------------------------------------------------------------------------------------------
def test_a_short_document_is_whole() -> None:
    assert cut_to_tokens(["page one", "page two"], 2, 100) == "page one\n\npage two"


def test_a_long_document_keeps_whole_pages_and_says_so() -> None:
    pages = ["a" * 30, "b" * 30, "c" * 30, "d" * 30]
    got = cut_to_tokens(pages, 7, 20)  # 80 characters: two pages fit
    assert got == f"{'a' * 30}\n\n{'b' * 30}\n\n[llmap: document cut to max_tokens = 20: pages 1-2 of 7 kept]"


def test_a_one_page_document_is_cut_at_paragraphs() -> None:
    text = "First paragraph here.\n\nSecond one.\n\nThird paragraph is long " + "x" * 50
    got = cut_to_tokens([text], 1, 10)
    assert got == ("First paragraph here.\n\nSecond one.\n\n"
                   "[llmap: document cut to max_tokens = 10: paragraphs 1-2 of 3 kept]")


def test_a_first_page_too_long_for_the_budget_is_cut_at_a_line_break() -> None:
    page = "\n".join(f"line {i:02d} of the timetable" for i in range(20))
    got = cut_to_tokens([page, "second page"], 2, 20)
    body, note = got.split("\n\n[llmap: ")
    assert len(body) <= 80 and body.endswith("of the timetable") and page.startswith(body)
    assert note == "document cut to max_tokens = 20: page 1 of 2 cut short]"


@pytest.mark.parametrize("value, url", [("https://x.org/a.pdf", True), ("HTTP://x", True), ("ftp://x/y", True),
                                        ("docs/a.pdf", False), ("C:\\docs\\a.pdf", False), ("/abs/a.pdf", False)])
def test_what_counts_as_a_url(value: str, url: bool) -> None:
    assert is_url(value) is url


# -- where paths may lead, and what they count as -------------------------------------------------------
def _spec(tmp_path: Path, extra_input: str = "", fetch: str = "") -> Path:
    (tmp_path / "in.csv").write_text("id,doc\n1,a.txt\n", encoding="utf-8")
    job = tmp_path / "job.toml"
    job.write_text(f"""
[input]
path = "in.csv"
key = "id"
{extra_input}
[input.documents]
doc = {{ kind = "text" }}
[prompt]
user = "{{{{ doc }}}}"
[output]
path = "out.jsonl"
[output.fields]
n = {{ type = "integer" }}
[model]
provider = "openai"
name = "sim"
base_url = "http://127.0.0.1:9/v1"
{fetch}
""", encoding="utf-8")
    return job


def _documents(tmp_path: Path, extra_input: str = "") -> Documents:
    spec = load_spec(_spec(tmp_path, extra_input))
    return Documents(spec, fingerprint="fp", variables=["doc"])


def test_paths_stay_inside_the_job_folder_and_document_dirs(tmp_path: Path) -> None:
    job_dir, shared, elsewhere = tmp_path / "job", tmp_path / "shared", tmp_path / "elsewhere"
    for d in (job_dir, shared, elsewhere):
        d.mkdir()
    (job_dir / "sub").mkdir()
    docs = _documents(job_dir, 'document_dirs = ["../shared"]')
    assert docs.locate("sub/a.pdf") == job_dir.resolve() / "sub" / "a.pdf"
    assert docs.locate("../shared/x.pdf") == shared.resolve() / "x.pdf"
    assert docs.locate(str(shared / "y.pdf")) == shared.resolve() / "y.pdf"
    for bad in ("../elsewhere/a.pdf", "sub/../../elsewhere/a.pdf", str(elsewhere / "a.pdf"), "/etc/passwd"):
        with pytest.raises(DocumentError, match="outside the folders documents may come from"):
            docs.locate(bad)
    (job_dir / "link.pdf").symlink_to(elsewhere / "secret.pdf")  # a link out is judged by where it leads
    with pytest.raises(DocumentError, match="outside the folders"):
        docs.locate("link.pdf")


def test_a_file_counts_by_its_content(tmp_path: Path) -> None:
    docs = _documents(tmp_path)
    (tmp_path / "a.txt").write_text("same words", encoding="utf-8")
    (tmp_path / "b.txt").write_text("same words", encoding="utf-8")
    a = docs.identity("doc", "a.txt")
    assert a.startswith("sha256:") and docs.identity("doc", "b.txt") == a  # a renamed identical file
    os.utime(tmp_path / "a.txt", ns=(5, 5))
    assert docs.identity("doc", "a.txt") == a  # touched, not changed
    (tmp_path / "a.txt").write_text("other words", encoding="utf-8")
    assert docs.identity("doc", "a.txt") not in (a, None)
    assert docs.identity("doc", "missing.txt") == "unreadable:missing.txt"
    assert docs.identity("doc", "../x.txt") == "unreadable:../x.txt"
    assert docs.identity("doc", None) is None and docs.identity("doc", "") == ""
    assert docs.identity("doc", "https://x.org/a") == "url:https://x.org/a"  # never fetched: fetched on its path
    docs.close()


def test_a_known_file_is_not_hashed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    docs = _documents(tmp_path)
    (tmp_path / "a.txt").write_text("words", encoding="utf-8")
    first = docs.identity("doc", "a.txt")
    calls = []
    monkeypatch.setattr(hashlib, "file_digest", lambda *a, **k: calls.append(a))
    assert docs.identity("doc", "a.txt") == first and calls == []
    docs.close()


# -- whole jobs -------------------------------------------------------------------------------------------
def _job(tmp_path: Path, sim: Simulator, rows: list[tuple[str, str]], *, kind: str = "auto", max_tokens: int = 4000,
         fetch: str = "", cache: bool = True) -> Path:
    with open(tmp_path / "in.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "doc"])
        w.writerows(rows)
    job = tmp_path / "job.toml"
    job.write_text(f"""
[input]
path = "in.csv"
key = "id"
[input.documents]
doc = {{ kind = "{kind}", max_tokens = {max_tokens} }}
[prompt]
user = "Schedule: {{{{ doc }}}}"
[output]
path = "out.jsonl"
[output.fields]
minutes = {{ type = "integer" }}
[model]
provider = "openai"
name = "sim"
base_url = "{sim.base_url}"
[cache]
enabled = {str(cache).lower()}
{fetch}
""", encoding="utf-8")
    return job


def _out(job: Path) -> dict[str, dict]:
    lines = (job.parent / "out.jsonl").read_text(encoding="utf-8").splitlines()
    return {str(r["id"]): r for r in map(json.loads, lines)}


def test_bad_documents_fail_alone_with_one_line_naming_them(tmp_path: Path) -> None:
    import pypdf

    enc = pypdf.PdfWriter(clone_from=pypdf.PdfReader(str(_write(tmp_path / "ok.pdf", pdf_with_text([["ok"]])))))
    enc.encrypt(user_password="pw", owner_password="pw", algorithm="RC4-128")
    enc.write(tmp_path / "locked.pdf")
    _write(tmp_path / "broken.pdf", b"%PDF-1.4\nnot really")
    with Simulator() as sim, PageServer() as server:
        server.pages["/big.pdf"] = Page(b"%PDF-" + b"x" * 3000)
        rows = [("1", "ok.pdf"), ("2", "missing.pdf"), ("3", "locked.pdf"), ("4", "broken.pdf"),
                ("5", server.url("/gone.pdf")), ("6", server.url("/big.pdf")), ("7", "../outside.pdf"),
                ("8", "ftp://x.org/a.pdf"), ("9", "http://127.0.0.1:9/private.pdf")]
        rows[8] = ("9", "http://0.0.0.0:9/private.pdf")  # refused even with allow_private (the test server needs it)
        job = _job(tmp_path, sim, rows, kind="pdf", fetch="[fetch]\nmax_mb = 0.001\nallow_private = true")
        res = Job.from_toml(job).run()
    out = _out(job)
    assert res.counts == {"pending": 0, "done": 1, "failed": 8, "skipped": 0, "fallback": 0} and res.exit_code == 1
    err = {k: r["_error"] for k, r in out.items()}
    assert err["1"] is None and out["1"]["_status"] == "done"
    expect = {"2": "missing.pdf: no such file", "3": "locked.pdf: the PDF is encrypted with a password",
              "4": "broken.pdf: corrupt PDF", "5": f"{server.url('/gone.pdf')}: HTTP 404 Not Found",
              "6": f"{server.url('/big.pdf')}: over the size cap", "7": "../outside.pdf: outside the folders",
              "8": "ftp://x.org/a.pdf: only http and https URLs are fetched", "9": "0.0.0.0 is the unspecified address"}
    for k, start in expect.items():
        assert start in err[k] and err[k].endswith("(column 'doc')") and "\n" not in err[k], (k, err[k])


def test_a_loopback_url_fails_its_row_unless_allowed(tmp_path: Path) -> None:
    (tmp_path / "ok.pdf").write_bytes(pdf_with_text([["Start 8:00"]]))
    with Simulator() as sim, PageServer() as server:
        server.pages["/s.pdf"] = Page(pdf_with_text([["Start 9:00"]]))
        job = _job(tmp_path, sim, [("1", "ok.pdf"), ("2", server.url("/s.pdf"))], kind="pdf")
        res = Job.from_toml(job).run()
        err = _out(job)["2"]["_error"]
        assert res.counts["done"] == 1 and res.counts["failed"] == 1 and server.total_hits(robots=True) == 0
        assert err == (f"{server.url('/s.pdf')}: 127.0.0.1 is a loopback address; set [fetch] allow_private = true "
                       "to fetch from it (column 'doc')")
        job.write_text(job.read_text() + "[fetch]\nallow_private = true\n", encoding="utf-8")
        res = Job.from_toml(job).run()  # the failed row is tried again, and may now fetch it
        assert res.counts["done"] == 2 and server.hits["/s.pdf"] == 1


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_a_column_none_of_whose_first_documents_resolves_is_exit_2(tmp_path: Path) -> None:
    with Simulator() as sim:
        job = _job(tmp_path, sim, [(str(i), f"nope/{i}.pdf") for i in range(8)], kind="pdf")
        with pytest.raises(SpecError, match=r"\[input.documents\] 'doc': none of the first 5 documents can be read "
                                            r"\(first: nope/0.pdf: no such file"):
            Job.from_toml(job).run()
        assert chat_requests(sim) == 0
        cli = subprocess.run([*LLMAP, "run", str(job), "--quiet"], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                 [str(Path(__file__).resolve().parents[2] / "src"), os.environ.get("PYTHONPATH", "")])})
        assert cli.returncode == 2 and "none of the first 5 documents can be read" in cli.stderr


def test_a_column_that_is_not_there_or_not_read_is_a_spec_error(tmp_path: Path) -> None:
    with Simulator() as sim:
        job = _job(tmp_path, sim, [("1", "a.pdf")])
        text = job.read_text()
        job.write_text(text.replace("doc = {", "scan = {"), encoding="utf-8")
        with pytest.raises(SpecError, match=r"\[input.documents\] 'scan' is not read by any template"):
            load_spec(job)
        job.write_text(text.replace("{{ doc }}", "{{ doc }} {{ scan }}").replace("doc = {", "scan = {"),
                       encoding="utf-8")
        with pytest.raises(SpecError, match=r"names column 'scan', which input .*in.csv lacks"):
            Job.from_toml(job).run()


def test_a_url_is_fetched_once_and_a_changed_page_is_seen(tmp_path: Path) -> None:
    with Simulator() as sim, PageServer() as server:
        server.pages["/s.txt"] = Page(b"Start 8:00, end 3:00", etag='"1"', headers={"Content-Type": "text/plain"})
        job = _job(tmp_path, sim, [("1", server.url("/s.txt")), ("2", server.url("/s.txt"))],
                   fetch="[fetch]\nallow_private = true")
        assert Job.from_toml(job).run().requests == 1  # two rows, one page, one request
        first = _out(job)["1"]["minutes"]
        assert server.hits["/s.txt"] == 1  # the preflight's fetch served the rows
        res = Job.from_toml(job).run()  # within max_age: nothing asked of anyone
        assert res.requests == 0 and server.hits["/s.txt"] == 1
        job.write_text(job.read_text() + 'max_age = "0s"\n', encoding="utf-8")  # every run checks the page
        res = Job.from_toml(job).run()  # unchanged: a 304, the same prompt, answered by the response cache
        assert res.requests == 0 and server.conditional["/s.txt"] == 1 and server.hits["/s.txt"] == 2
        assert {r["_source"] for r in _out(job).values()} == {"cache"}
        res = Job.from_toml(job).run()  # every run checks it once more; still no model request
        assert res.requests == 0 and server.conditional["/s.txt"] == 2 and server.hits["/s.txt"] == 3
        server.pages["/s.txt"] = Page(b"Start 9:00, end 4:00", etag='"2"', headers={"Content-Type": "text/plain"})
        res = Job.from_toml(job).run()
        assert res.requests == 1 and res.counts["done"] == 2 and _out(job)["1"]["minutes"] != first


def test_a_long_document_is_cut_and_the_prompt_says_so(tmp_path: Path) -> None:
    pages = [[f"Page {p} line {i} of the timetable" for i in range(10)] for p in range(1, 6)]
    (tmp_path / "long.pdf").write_bytes(pdf_with_text(pages))
    with Simulator() as sim:
        job = _job(tmp_path, sim, [("1", "long.pdf")], kind="pdf", max_tokens=200)
        subprocess.run([*LLMAP, "run", str(job), "--quiet", "--log-json", str(tmp_path / "log.jsonl"),
                        "--log-prompts"], check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                            [str(Path(__file__).resolve().parents[2] / "src"), os.environ.get("PYTHONPATH", "")])})
    events = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    prompts = [m["content"] for e in events for m in e.get("messages") or [] if m["role"] == "user"]
    assert len(prompts) == 1
    assert prompts[0].startswith("Schedule: Page 1 line 0 of the timetable\n")  # the text, as sent
    assert prompts[0].endswith("[llmap: document cut to max_tokens = 200: pages 1-2 of 5 kept]")
    assert "Page 2 line 9" in prompts[0] and "Page 3" not in prompts[0]


def test_an_image_goes_as_an_image_part_to_a_model_that_takes_images(tmp_path: Path, monkeypatch) -> None:
    import base64

    from _documents import png
    from _support import ScriptedProvider, with_providers

    pytest.importorskip("PIL")
    picture = png(["Lunch 35 min"])
    (tmp_path / "s.png").write_bytes(picture)
    provider = ScriptedProvider("openai:gpt-4o", lambda n, req: '{"minutes": 35}')
    with_providers(monkeypatch, [provider])
    with Simulator() as sim:
        job = _job(tmp_path, sim, [("1", "s.png")], kind="image")
        job.write_text(job.read_text().replace('name = "sim"', 'name = "sim"\nimages = true'), encoding="utf-8")
        res = Job.from_toml(job).run()
    assert res.counts["done"] == 1
    content = provider.requests[0].messages[-1]["content"]
    assert content[0] == {"type": "text", "text": "Schedule: "}
    url = content[1]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,") and base64.b64decode(url.split(",", 1)[1]) == picture


@pytest.mark.ocr
def test_an_image_is_read_by_ocr_for_a_model_without_images(tmp_path: Path, monkeypatch) -> None:
    import shutil

    from _documents import png
    from _support import ScriptedProvider, with_providers

    if shutil.which("tesseract") is None:
        pytest.skip("needs Tesseract")
    (tmp_path / "s.png").write_bytes(png(["Lunch 35 min"]))
    provider = ScriptedProvider("openai:sim", lambda n, req: '{"minutes": 35}')
    with_providers(monkeypatch, [provider])
    with Simulator() as sim:
        job = _job(tmp_path, sim, [("1", "s.png")])  # kind auto; the model "sim" takes no images
        Job.from_toml(job).run()
    assert provider.requests[0].messages[-1]["content"] == "Schedule: Lunch 35 min"


def test_if_changed_never_skips_a_job_with_documents(tmp_path: Path) -> None:
    from llmap.store.fingerprint import unchanged_since_complete

    (tmp_path / "a.txt").write_text("Start 8:00", encoding="utf-8")
    with Simulator() as sim:
        job = _job(tmp_path, sim, [("1", "a.txt")])
        assert Job.from_toml(job).run().requests == 1
        plain = job.read_text().replace("[input.documents]\ndoc = { kind = \"auto\", max_tokens = 4000 }\n", "")
        (tmp_path / "plain.toml").write_text(plain, encoding="utf-8")
        assert Job.from_toml(tmp_path / "plain.toml").run().counts["done"] == 1
        assert unchanged_since_complete(load_spec(tmp_path / "plain.toml")) is not None  # the input is all it reads
        assert unchanged_since_complete(load_spec(job)) is None  # a.txt may change under the same input
        (tmp_path / "a.txt").write_text("Start 9:00", encoding="utf-8")
        assert Job.from_toml(job).run().requests == 1


def test_packed_rows_carry_their_documents_text(tmp_path: Path, monkeypatch) -> None:
    from _support import ScriptedProvider, with_providers

    for i in range(4):
        (tmp_path / f"{i}.txt").write_text(f"Schedule number {i}", encoding="utf-8")

    def answer(n, req):
        items = json.loads(req.messages[-1]["content"].split("\n")[-1])
        return json.dumps({"items": [{"id": it["id"], "minutes": 300 + int(it["id"])} for it in items]})

    provider = ScriptedProvider("openai:sim", answer)
    with_providers(monkeypatch, [provider])
    with Simulator() as sim:
        job = _job(tmp_path, sim, [(str(i), f"{i}.txt") for i in range(4)], kind="text")
        job.write_text(job.read_text().replace("[output]", "pack = 2\n[output]"), encoding="utf-8")
        res = Job.from_toml(job).run()
    assert res.counts["done"] == 4 and len(provider.requests) == 2
    sent = "".join(r.messages[-1]["content"] for r in provider.requests)
    assert all(f"Schedule number {i}" in sent for i in range(4)) and "_llmap" not in sent and ".txt" not in sent


def test_odd_cells_fail_their_row_and_never_the_plan(tmp_path: Path) -> None:
    docs = _documents(tmp_path)
    assert docs.identity("doc", "a\x00b.txt") == "unreadable:a\x00b.txt"
    assert docs.identity("doc", 42) == "unreadable:42"
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    assert docs.identity("doc", "loop").startswith("unreadable:")
    docs.close()
