"""The simulator's hidden groups: embeddings near within a group, operator steps answered from the truth."""

from __future__ import annotations

import json
import urllib.request

import numpy as np

from llmap.sim import Simulator
from llmap.sim.datasets import adjusted_rand, entities, pair_scores, skewed_sizes, titles, write
from llmap.sim.groups import GroupBook


def _post(sim, path, body):
    req = urllib.request.Request(f"{sim.url}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _chat(sim, title, user, packed=False):
    item = {"type": "object", "title": title, "properties": {"same": {"type": "boolean"}}}
    schema = ({"type": "object", "properties": {"items": {"type": "array", "items": item}}} if packed
              else item)
    body = {"model": "sim", "messages": [{"role": "user", "content": user}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}}
    return json.loads(_post(sim, "/v1/chat/completions", body)["choices"][0]["message"]["content"])


def test_embeddings_put_a_group_together_and_apart_from_others(tmp_path):
    rows = titles(60, 4, seed=2)
    write(rows, tmp_path / "t.csv")
    with Simulator(groups=str(tmp_path / "t.csv"), embed_noise=0.3) as sim:
        doc = _post(sim, "/v1/embeddings", {"model": "e", "input": [r["text"] for r in rows]})
        again = _post(sim, "/v1/embeddings", {"model": "e", "input": rows[0]["text"]})
    v = np.array([d["embedding"] for d in doc["data"]])
    assert v.shape == (60, 64) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    assert again["data"][0]["embedding"] == doc["data"][0]["embedding"]  # deterministic
    g = np.array([r["group"] for r in rows])
    sims = v @ v.T
    same = sims[(g[:, None] == g[None, :]) & ~np.eye(60, dtype=bool)]
    other = sims[g[:, None] != g[None, :]]
    assert same.min() > other.max()


def test_pair_verdicts_follow_the_truth_with_the_error_rate(tmp_path):
    rows = entities(300, seed=4)
    write(rows, tmp_path / "n.csv")
    book = GroupBook(tmp_path / "n.csv")
    pairs = [(rows[i]["text"], rows[i + 1]["text"]) for i in range(0, 280, 2)]
    with Simulator(groups=str(tmp_path / "n.csv"), group_error_rate=0.2) as sim:
        items = [{"id": str(i), "a": a, "b": b} for i, (a, b) in enumerate(pairs)]
        answer = _chat(sim, "llmap_resolve_judge", "Items (JSON array):\n" + json.dumps(items), packed=True)
        single = _chat(sim, "llmap_resolve_judge", f"A: {pairs[0][0]}\nB: {pairs[0][1]}")
    verdicts = {it["id"]: it["same"] for it in answer["items"]}
    truth = {str(i): book.group_of(a) == book.group_of(b) for i, (a, b) in enumerate(pairs)}
    wrong = sum(verdicts[k] != truth[k] for k in truth) / len(truth)
    assert 0.1 < wrong < 0.3  # 20% flipped
    assert single == {"same": verdicts["0"]}  # the same pair, packed or not, gets the same verdict


def test_proposals_name_the_groups_of_a_window(tmp_path):
    rows = titles(40, 3, seed=6)
    write(rows, tmp_path / "t.csv")
    window = [{"id": str(i + 1), "text": r["text"]} for i, r in enumerate(rows)]
    with Simulator(groups=str(tmp_path / "t.csv")) as sim:
        schema = {"type": "object", "title": "llmap_cluster_propose", "properties": {"families": {"type": "array"}}}
        body = {"model": "sim", "messages": [{"role": "user", "content": "Rows:\n" + json.dumps(window)}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}}
        fams = json.loads(_post(sim, "/v1/chat/completions", body)["choices"][0]["message"]["content"])["families"]
    label = {m: f["name"] for f in fams for m in f["members"]}
    assert adjusted_rand([r["group"] for r in rows], [label.get(str(i + 1)) for i in range(40)]) == 1.0
    assert {f["name"] for f in fams} == {r["name"] for r in rows}


def test_datasets_are_skewed_and_scores_are_right():
    sizes = skewed_sizes(7500, 300)
    assert sum(sizes) == 7500 and min(sizes) >= 3 and max(sizes) > 50 * min(sizes)
    assert len({r["text"] for r in titles(2000, 80)}) == 2000
    assert pair_scores(["a", "a", "b"], ["x", "x", None]) == (1.0, 1.0, 1)
    assert adjusted_rand([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == 0.24242424242424246  # scikit-learn's figure
