"""``[cascade]``: its keys (checked by name) and its checks against the rest of the job, each a one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmap.errors import SpecError
from llmap.plan import cascade_field, load_spec

FIELDS = 'kind = { type = "string", enum = ["a", "b"] }\nok = { type = "boolean" }'
PROXY = '[[model]]\nprovider = "openai"\nname = "mini"\nbase_url = "http://127.0.0.1:9/v1"\n'
ORACLE = '[[model]]\nprovider = "openai"\nname = "big"\nbase_url = "http://127.0.0.1:9/v1"\n'


def job(tmp_path: Path, cascade: str, *, models: str = PROXY + ORACLE, fields: str = FIELDS, output: str = "") -> Path:
    (tmp_path / "rows.csv").write_text("id,text\n1,x\n", encoding="utf-8")
    path = tmp_path / "job.toml"
    path.write_text(f'[input]\npath = "rows.csv"\nkey = "id"\n[prompt]\nuser = "{{{{ text }}}}"\n'
                    f'[output]\npath = "out.csv"\n{output}\n[output.fields]\n{fields}\n{models}\n'
                    f'[cascade]\n{cascade}\n',
                    encoding="utf-8")
    return path


def test_the_keys_by_name_and_their_defaults(tmp_path):
    spec = load_spec(job(tmp_path, 'guarantee = "precision"\nfield = "ok"\ntarget = 0.95\ndelta = 0.01\n'
                                   'label_budget = 250\non_miss = "escalate_all"\nseed = 4'))
    c = spec.cascade
    assert (c.guarantee, c.field, c.target, c.delta, c.label_budget, c.on_miss, c.seed) == (
        "precision", "ok", 0.95, 0.01, 250, "escalate_all", 4)
    spec = load_spec(job(tmp_path, "target = 0.9", fields='kind = { type = "string" }'))
    c = spec.cascade
    assert (c.guarantee, c.delta, c.label_budget, c.on_miss, c.seed) == ("agreement", 0.05, 400, "stop", 0)
    assert cascade_field(spec) == "kind"  # the only field


@pytest.mark.parametrize(("cascade", "extra", "message"), [
    ("field = \"kind\"", {}, r"\[cascade\] target is required"),
    ("target = 1.0\nfield = \"kind\"", {}, r"\[cascade\] target: Input should be less than 1"),
    ("target = 0.9\ndelta = 0\nfield = \"kind\"", {}, r"\[cascade\] delta: Input should be greater than 0"),
    ("target = 0.9\nfield = \"kind\"\nguarantee = \"accuracy\"", {}, r"guarantee: Input should be 'agreement', "
     "'precision' or 'recall'"),
    ("target = 0.9\nfield = \"kind\"\non_miss = \"ignore\"", {}, r"on_miss: Input should be 'escalate_all' or 'stop'"),
    ("target = 0.9\nfield = \"kind\"\nlabel_budgett = 10", {}, r"unknown key 'label_budgett' in \[cascade\]; did you "
     "mean 'label_budget'"),
    ("target = 0.9", {}, r"\[cascade\] field is required when the job has several fields; name the one the promise "
     "is about, one of: kind, ok"),
    ("target = 0.9\nfield = \"knd\"", {}, r"\[cascade\] field 'knd' is not an output field; did you mean 'kind'"),
    ("target = 0.9\nfield = \"kind\"\nguarantee = \"recall\"", {}, r"guarantee = 'recall' is about a boolean field"),
    ("target = 0.9\nfield = \"kind\"", {"models": PROXY}, r"needs exactly two \[\[model\]\] tables, the proxy first "
     "and the oracle last; the job has 1"),
    ("target = 0.9\nfield = \"kind\"", {"models": PROXY + ORACLE + ORACLE}, r"the job has 3"),
    ("target = 0.9\nfield = \"kind\"", {"models": PROXY + 'escalate_if = "kind = \'b\'"\n' + ORACLE},
     r"drop escalate_if from \[\[model\]\] 'mini'"),
    ("target = 0.9\nfield = \"kind\"", {"output": "confidence = false"},
     r"\[output\] confidence = false turns off; drop it"),
    ("target = 0.9\nfield = \"kind\"", {"models": PROXY.replace('"openai"', '"anthropic"') + ORACLE},
     r"returns no log-probabilities"),
])
def test_a_bad_cascade_is_one_line_naming_the_fix(tmp_path, cascade, extra, message):
    with pytest.raises(SpecError, match=message) as info:
        load_spec(job(tmp_path, cascade, **extra))
    assert "\n" not in str(info.value)


def test_either_model_may_go_by_batch_in_a_cascade(tmp_path):
    models = PROXY + ORACLE + "batch = true\n"
    spec = load_spec(job(tmp_path, 'target = 0.9\nfield = "kind"', models=models))
    assert spec.models[1].batch
