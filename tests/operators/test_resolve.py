"""kind = "resolve" end to end: blocking by embeddings, the auto threshold, pairs judged packed, components."""

from __future__ import annotations

from llmap import Job
from llmap.operators.resolve import auto_threshold, candidate_pairs
from llmap.sim import Simulator
from llmap.sim.datasets import entities, pair_scores, write
from operators.conftest import group_stats, op_job, read_table


def test_resolve_finds_the_duplicates_judging_a_sliver_of_the_pairs(tmp_path):
    rows = entities(400, seed=5)
    write(rows, tmp_path / "names.csv")
    with Simulator(groups=str(tmp_path / "names.csv"), group_error_rate=0.05) as sim:
        job = op_job(tmp_path, sim, "resolve", data="names.csv", system="Rows are company names.",
                     out="out/e.csv", keep='keep = ["text"]')
        res = Job.from_toml(job).run()
        assert res.exit_code == 0, res.stop_reason
        judged = group_stats(sim)["llmap_resolve_judge"]
        s = res.operator
        assert s["judged"] < 0.02 * s["all_pairs"] and judged == res.requests  # never all pairs
        assert 0.3 < s["threshold"] < 1.0 and s["merges_sample"]  # the report's sample of merges
        again = Job.from_toml(job).run()
        assert again.requests == 0
    out = read_table(tmp_path / "out" / "e.csv")
    truth = {r["id"]: r["group"] for r in rows}
    recall, precision, n_pairs = pair_scores([truth[r["id"]] for r in out], [r["_entity"] for r in out])
    assert n_pairs > 100 and recall >= 0.95 and precision >= 0.9, (recall, precision)
    by_id = {r["id"]: r for r in out}
    for r in out:  # an entity is named by the key of one of its rows, which names itself
        assert by_id[r["_entity"]]["_entity"] == r["_entity"]


def test_auto_threshold_ignores_wrong_verdicts_on_dissimilar_pairs():
    right = [(0.9 - i * 0.005, True) for i in range(40)] + [(0.3 + i * 0.001, False) for i in range(150)]
    wrong = [(0.05, True), (0.12, True), (0.2, True)]  # the model said "same" on three unrelated pairs
    t = auto_threshold(right + wrong, 0.95)
    assert 0.7 < t < 0.72  # the 5% quantile of the true positives, not the wrong verdicts' 0.05
    assert auto_threshold([(0.9, True)] * 4 + [(0.1, False)] * 50, 0.95) is None  # too few to set it
    spread = [(0.5 + i / 200, True) for i in range(100)]  # positives spread out: nothing is cut as an outlier
    assert auto_threshold(spread, 0.9) == 0.55


def test_candidate_pairs_are_the_nearest_neighbours_only():
    import numpy as np

    rng = np.random.default_rng(1)
    v = rng.normal(size=(50, 8)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    pairs = candidate_pairs(v, 3)
    assert all(i < j for i, j in pairs) and len(pairs) <= 50 * 3
    sims = v @ v.T
    for i in range(50):
        best = [j for j in np.argsort(-sims[i]) if j != i][:3]
        assert all((min(i, j), max(i, j)) in pairs for j in best)
