"""What a new user hit writing a job from the docs: each a one-line error (exit 2), or a rule that now works."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from _support import chat_requests
from llmap import Job
from llmap.cli import app
from llmap.errors import SpecError
from llmap.plan import spec_from_dict
from llmap.prompt.render import Renderer

runner = CliRunner()


def _run(job):
    res = runner.invoke(app, ["run", str(job)])
    return res.exit_code, (res.stderr or "") + (res.stdout or "")


def _one_error_line(code: int, text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("llmap: error:"), text
    return lines[0]


def test_a_models_table_is_refused_not_ignored(make_job, sim):
    # [models] (not [model]) used to be overwritten by the spec's own attribute: the run used the embedded
    # model and sent 0 requests to the model the user wrote.
    job = make_job(3)
    job.write_text(job.read_text().replace("[model]\n", "[models]\n"))
    line = _one_error_line(*_run(job))
    assert "unknown table [models]" in line and "[model]" in line
    assert chat_requests(sim) == 0


def test_an_unknown_key_suggests_the_closest(make_job, sim):
    job = make_job(3, model_extra="temprature = 0")
    line = _one_error_line(*_run(job))
    assert "unknown key 'temprature' in [model]; did you mean 'temperature'?" in line
    assert "docs/job-spec.md" in line


@pytest.mark.parametrize("name", ["gemma-3-1b", "llama-3.1-8b"])
def test_the_local_provider_refuses_a_model_it_does_not_have(make_job, sim, name):
    # provider = "local" with name = "gemma-3-1b" ran Gemma 270M and stamped _model = "local:gemma-3-1b".
    job = make_job(3)
    text = job.read_text()
    model = text[text.index("[model]"):text.index("[limits]")]
    job.write_text(text.replace(model, f'[model]\nprovider = "local"\nname = "{name}"\n'))
    line = _one_error_line(*_run(job))
    assert f"name {name!r} is not an embedded model" in line and "gemma-3-270m" in line and "model_path" in line


def test_the_local_provider_takes_its_own_name_or_a_gguf_label(tmp_path):
    base = {"input": {"sql": "SELECT 1 AS a"}, "prompt": {"user": "{{ a }}"},
            "output": {"path": "o.csv", "fields": {"k": {"type": "string"}}}}
    for model in ({"provider": "local"}, {"provider": "local", "name": "gemma-3-270m"},
                  {"provider": "local", "name": "my-model", "model_path": "m.gguf"}):
        spec = spec_from_dict({**base, "model": model}, base_dir=tmp_path, name="j")
        assert spec.model.provider == "local"


NULLABLE = '''
minutes = { type = "integer", minimum = 60, maximum = 600, nullable = true }
start = { type = "string", nullable = true }
'''


def test_a_nullable_field_left_out_of_an_example_is_null(make_job, sim):
    # TOML has no null: "" broke the pattern, and leaving the key out was "Field required", so the model never
    # saw a "not stated" case. Now a nullable field left out of an example's output means null.
    job = make_job(3, fields=NULLABLE, prompt_extra=(
        'examples = [{ input = { name = "A", city = "B" }, output = { minutes = 360, start = "8:00" } },\n'
        '            { input = { name = "C", city = "D" }, output = { } }]'))
    spec = Job.from_toml(job).spec
    assert spec.prompt.examples[1].output == {"minutes": None, "start": None}
    messages = Renderer.from_spec(spec.prompt).messages({"name": "x", "city": "y"})
    assert json.loads(messages[4]["content"]) == {"minutes": None, "start": None}  # the model is shown the null
    code, text = _run(job)
    assert code == 0, text


def test_a_required_field_left_out_of_an_example_says_how_to_show_null(make_job, sim):
    job = make_job(3, fields='minutes = { type = "integer" }\n',
                   prompt_extra='examples = [{ input = { name = "A", city = "B" }, output = { } }]')
    line = _one_error_line(*_run(job))
    assert "examples #1" in line and "'minutes'" in line and "nullable = true" in line


def test_a_misspelt_template_column_points_at_the_template_even_with_examples(make_job, sim):
    # With few-shot examples present, the error used to say "examples #1: input lacks 'nme'".
    job = make_job(3, user="Name: {{ nme }}; city: {{ city }}.", prompt_extra=(
        'examples = [{ input = { name = "A", city = "B" }, output = { kind = "a", score = 0.5 } }]'))
    line = _one_error_line(*_run(job))
    assert "[prompt] template names column 'nme'" in line and "did you mean 'name'?" in line
    assert "input columns: id, name, city, age" in line and "examples" not in line
    assert chat_requests(sim) == 0


def test_an_example_lacking_a_real_column_still_names_the_example(make_job, sim):
    job = make_job(3, prompt_extra='examples = [{ input = { name = "A" }, output = { kind = "a", score = 0.5 } }]')
    line = _one_error_line(*_run(job))
    assert "examples #1: input lacks 'city'" in line


def test_the_python_api_still_checks_examples_before_any_row(tmp_path):
    import llmap

    with pytest.raises(SpecError, match="examples #1: input lacks 'city'"):
        llmap.map([{"name": "x", "city": "y"}], prompt="{{ name }} {{ city }}", fields={"k": "string"},
                  examples=[{"input": {"name": "A"}, "output": {"k": "a"}}])
