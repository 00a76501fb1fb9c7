"""``llmap estimate`` with document columns: stored texts counted exactly, unread ones at their max_tokens, image
tokens by each provider's published formula, and nothing fetched or written."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmap.observe.estimate.images import anthropic_image_tokens, image_tokens, openai_image_tokens
from llmap.spec import ModelSpec


@pytest.mark.parametrize("model, w, h, tokens", [
    ("gpt-4o", 1024, 1024, 765),  # the guide's example: 4 tiles
    ("gpt-4o", 2048, 4096, 1105),  # 1024 x 2048, then 768 x 1536: 6 tiles
    ("gpt-4o", 300, 200, 255),  # one tile
    ("gpt-4.1", 1024, 1024, 765),
    ("gpt-4o-mini", 1024, 1024, 2833 + 4 * 5667),
    ("o3", 1024, 1024, 75 + 4 * 150),
    ("gpt-5", 1024, 1024, 70 + 4 * 140),
    ("gpt-4.1-mini", 1024, 1024, 1659),  # 32 x 32 patches x 1.62
    ("gpt-4.1-mini", 1800, 2400, 2353),  # the guide's example: scaled to 1056 x 1408, 1452 patches x 1.62
    ("gpt-4.1-nano", 100, 100, 40),  # 16 patches x 2.46
    ("o4-mini", 100, 100, 28),  # 16 patches x 1.72
])
def test_openai_formula(model: str, w: int, h: int, tokens: int) -> None:
    assert openai_image_tokens(model, w, h) == tokens


@pytest.mark.parametrize("w, h, tokens", [(1000, 1000, 1334), (200, 200, 54), (4000, 3000, 1600), (1568, 400, 837)])
def test_anthropic_formula(w: int, h: int, tokens: int) -> None:
    assert anthropic_image_tokens(w, h) == tokens


def test_the_provider_picks_the_formula() -> None:
    assert image_tokens(ModelSpec(provider="anthropic", name="claude-haiku-4-5"), 1000, 1000) == 1334
    assert image_tokens(ModelSpec(provider="openai", name="gpt-4o"), 1024, 1024) == 765
    assert image_tokens(ModelSpec(), 1000, 1000) == 0


def _job(tmp_path: Path, base_url: str, kind: str = "text", model: str = 'provider = "openai"\nname = "sim"') -> Path:
    job = tmp_path / "job.toml"
    job.write_text(f"""
[input]
path = "in.csv"
key = "id"
[input.documents]
doc = {{ kind = "{kind}", max_tokens = 100 }}
[prompt]
user = "Doc: {{{{ doc }}}}"
[output]
path = "out.jsonl"
[output.fields]
n = {{ type = "integer" }}
[model]
{model}
base_url = "{base_url}"
""", encoding="utf-8")
    return job


def test_unread_documents_count_at_max_tokens_and_read_ones_exactly(tmp_path: Path, sim) -> None:
    from llmap import Job
    from llmap.observe.estimate.rows import estimate
    from llmap.plan import load_spec

    for i, text in enumerate(["short one", "another short text", "third"]):
        (tmp_path / f"{i}.txt").write_text(text, encoding="utf-8")
    (tmp_path / "in.csv").write_text("id,doc\n0,0.txt\n1,1.txt\n2,2.txt\n", encoding="utf-8")
    job = _job(tmp_path, sim.base_url)
    cache = tmp_path / "llmap-cache" / "documents.sqlite"
    est = estimate(load_spec(job))
    assert est.to_request == 3 and est.documents_unread == 3 and est.prompt_chars >= 3 * 400
    assert not cache.exists()  # the estimate wrote nothing
    from llmap.observe.estimate.table import estimate_text

    assert "documents not read yet" in estimate_text(est) and "an upper bound" in estimate_text(est)
    Job.from_toml(job).run()
    (tmp_path / "in.csv").write_text("id,doc\n5,0.txt\n6,1.txt\n7,2.txt\n", encoding="utf-8")  # new rows, same docs
    job.write_text(job.read_text().replace("[cache]", "") + "[cache]\nenabled = false\n", encoding="utf-8")
    est = estimate(load_spec(job))
    assert est.documents_unread == 0 and est.to_request == 3
    assert est.prompt_chars == sum(len(f"Doc: {t}") for t in ["short one", "another short text", "third"])
    assert "document(s) not read yet" not in " ".join(est.notes)


def test_images_sent_as_parts_count_by_the_providers_formula(tmp_path: Path, monkeypatch) -> None:
    from _documents import png
    from llmap.io.extract import image_info
    from llmap.observe.estimate.rows import estimate
    from llmap.plan import load_spec

    pytest.importorskip("PIL")
    data = png(["Lunch 35 min"])
    (tmp_path / "a.png").write_bytes(data)
    (tmp_path / "in.csv").write_text("id,doc\n1,a.png\n", encoding="utf-8")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
    job = _job(tmp_path, "http://127.0.0.1:9", kind="image", model='provider = "anthropic"\nname = "claude-haiku-4-5"')
    est = estimate(load_spec(job))
    _, w, h = image_info(data)
    assert est.images == 1 and est.image_tokens == anthropic_image_tokens(w, h) and est.documents_unread == 0
    assert est.prompt_tokens == est.image_tokens + -(-len("Doc: ") // 4)
    assert any("image(s) sent as image parts" in n for n in est.notes)
