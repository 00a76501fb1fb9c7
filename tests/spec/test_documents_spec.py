"""``[input.documents]``, ``[fetch]`` and ``[model] images``: defaults, one-line errors, the fingerprint."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmap.errors import SpecError
from llmap.plan import spec_from_dict
from llmap.spec import DocumentSpec, FetchSpec, ModelSpec, parse_spec


def _doc(**over) -> dict:
    doc = {
        "input": {"path": "in.csv", "documents": {"schedule": {"kind": "pdf", "max_tokens": 4000}}},
        "prompt": {"user": "{{ schedule }}"},
        "output": {"path": "out.jsonl", "fields": {"minutes": {"type": "integer"}}},
        "model": {"provider": "openai", "name": "sim", "base_url": "http://127.0.0.1:9/v1"},
    }
    for key, value in over.items():
        table, _, name = key.partition("__")
        if name:
            doc.setdefault(table, {})[name] = value
        else:
            doc[table] = value
    return doc


def _parse(**over):
    return parse_spec(_doc(**over), base_dir=Path("."), name="job", source="job.toml")


def test_defaults() -> None:
    d = DocumentSpec()
    assert (d.kind, d.max_tokens, d.ocr_lang) == ("auto", 4000, "eng")
    f = FetchSpec()
    assert not f.allow_private and f.robots and f.per_host_rpm == 60 and f.per_host_concurrency == 2
    assert f.max_bytes == 20_000_000 and f.max_age_s == 86400 and f.max_attempts == 3 and f.max_redirects == 5
    spec = _parse()
    assert spec.input.documents["schedule"].kind == "pdf" and spec.fetch == FetchSpec()


@pytest.mark.parametrize("over, message", [
    ({"input__documents": {"schedule": {"kind": "docx"}}},
     "[input.documents.schedule] kind: Input should be 'auto', 'pdf', 'html', 'image' or 'text'"),
    ({"input__documents": {"schedule": {"max_tokens": 0}}}, "max_tokens: Input should be greater than or equal to 1"),
    ({"input__documents": {"schedule": {"kind": "pdf", "pages": 3}}},
     "unknown key 'pages' in [input.documents.schedule]"),
    ({"input__documents": {"schedule": {"ocr_lang": "eng; rm -rf"}}}, "ocr_lang: String should match pattern"),
    ({"fetch": {"max_age": "soon"}}, "[fetch] max_age: max_age 'soon' is not a duration"),
    ({"fetch": {"allow_privat": True}}, "unknown key 'allow_privat' in [fetch]"),
    ({"fetch": {"per_host_rpm": 0}}, "[fetch] per_host_rpm: Input should be greater than 0"),
])
def test_bad_keys_are_one_line_errors(over: dict, message: str) -> None:
    with pytest.raises(SpecError) as err:
        _parse(**over)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_which_models_take_images() -> None:
    assert ModelSpec(provider="anthropic", name="claude-haiku-4-5").takes_images
    assert ModelSpec(provider="openai", name="gpt-4o-mini").takes_images
    assert not ModelSpec(provider="openai", name="gpt-3.5-turbo").takes_images
    assert not ModelSpec(provider="openai", name="o3-mini").takes_images
    assert ModelSpec(provider="openai", name="my-model", images=True).takes_images
    assert not ModelSpec(provider="anthropic", name="claude-haiku-4-5", images=False).takes_images
    assert not ModelSpec().takes_images  # the embedded model
    with pytest.raises(ValueError, match="images = true is for provider = 'openai' or 'anthropic'"):
        ModelSpec(images=True)


def test_documents_change_the_request_fingerprint_only_when_set() -> None:
    plain = parse_spec({**_doc(), "input": {"path": "in.csv"}}, base_dir=Path("."), name="job")
    pdf = _parse()
    html = _parse(input__documents={"schedule": {"kind": "html"}})
    cut = _parse(input__documents={"schedule": {"kind": "pdf", "max_tokens": 100}})
    prints = {s.request_fingerprint() for s in (plain, pdf, html, cut)}
    assert len(prints) == 4
    # a spec without documents keeps the fingerprint it had before documents existed
    assert "documents" not in plain.model_dump_json(exclude_defaults=True)


@pytest.mark.parametrize("over, message", [
    ({"prompt": {"user": "no column"}}, "[input.documents] 'schedule' is not read by any template"),
    ({"prompt": {"system": "{{ schedule }}", "user": "x"},
      "input__documents": {"schedule": {"kind": "image"}},
      "model": {"provider": "anthropic", "name": "claude-haiku-4-5"}},
     "'schedule' may hold an image, which goes to the model as an image part"),
    ({"model": {"provider": "openai", "name": "gpt-4o", "base_url": "http://x/v1", "batch": True}},
     "[input.documents] does not go with [model] batch"),
    ({"model": [{"provider": "openai", "name": "proxy", "base_url": "http://x/v1"},
                {"provider": "openai", "name": "oracle", "base_url": "http://x/v1"}], "cascade": {"target": 0.9}},
     "[cascade] does not read [input.documents] yet"),
])
def test_plan_checks(over: dict, message: str, monkeypatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
    with pytest.raises(SpecError, match=None) as err:
        spec_from_dict(_doc(**over), base_dir=Path("."), name="job", source="job.toml")
    assert message in str(err.value)


def test_an_image_in_the_system_prompt_is_fine_when_images_are_read_by_ocr() -> None:
    doc = _doc(prompt={"system": "{{ schedule }}", "user": "x"}, input__documents={"schedule": {"kind": "image"}})
    spec_from_dict(doc, base_dir=Path("."), name="job", source="job.toml")  # "sim" takes no images: OCR


def test_missing_libraries_are_named_with_the_extra(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "pypdf" else real(name))
    with pytest.raises(SpecError, match=r"\[input.documents\] 'schedule' \(kind = 'pdf'\) needs pypdf; install them "
                                        r"with `pip install 'llmap\[documents\]'`"):
        spec_from_dict(_doc(), base_dir=Path("."), name="job", source="job.toml")


def test_document_columns_are_refused_on_ray_before_anything_runs(tmp_path) -> None:
    from llmap.engine import Job

    (tmp_path / "in.csv").write_text("id,schedule\n1,a.pdf\n", encoding="utf-8")
    spec = spec_from_dict(_doc(), base_dir=tmp_path, name="job", source="job.toml")
    with pytest.raises(SpecError, match=r"\[input.documents\] are read in this process, not by Ray workers"):
        Job(spec).run(executor="ray")
    assert not (tmp_path / ".llmap").exists()  # refused before the ledger was opened
