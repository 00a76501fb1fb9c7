"""``llmap init DATA``: write a commented job file over a data file, one that runs as written."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from llmap.cli.common import fail, out, paragraphs, say
from llmap.errors import SpecError

__all__ = ["init"]


@paragraphs
def init(
    data: Annotated[Path, typer.Argument(metavar="DATA", show_default=False,
                                         help="A data file: .csv, .parquet or .jsonl.")],
    output: Annotated[Path, typer.Option(
        "--output", "-o", metavar="JOB.toml", help="Where to write the job file.")] = Path("job.toml"),
    model: Annotated[str | None, typer.Option(
        "--model", "-m", metavar="NAME", show_default=False,
        help="local (the embedded Gemma 3 270M, the default: offline, free), a Claude model (claude-haiku-4-5), "
             "or any other name for an OpenAI-compatible API (gpt-4o-mini; a server with --base-url).")] = None,
    base_url: Annotated[str | None, typer.Option(
        "--base-url", metavar="URL", show_default=False, help="The server for --model.")] = None,
    api_key_env: Annotated[str | None, typer.Option(
        "--api-key-env", metavar="VAR", show_default=False,
        help="The environment variable holding the API key.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite the job file if it exists.")] = False,
) -> None:
    """Write a job file for a data file: the key guessed, a prompt naming its text columns, one output field,
    a model.

    It reads the file's header and a sample of rows the way llmap run does. The job runs as written (with the
    embedded model, offline); edit the prompt and the fields, look at a few answers with
    llmap run JOB --preview 5, then run it all with llmap run JOB.
    """
    from llmap.api import model_table
    from llmap.draft import draft_job
    from llmap.io.diagnose import missing_file
    from llmap.plan import load_spec
    from llmap.spec.toml import dumps

    if output.suffix.lower() != ".toml":
        raise fail(f"--output {output}: a job file ends in .toml")
    if output.exists() and not force:
        raise fail(f"{output} exists; choose another --output, or add --force to overwrite it")
    if not data.is_file():
        raise fail(missing_file("data file", Path(os.path.abspath(data))))
    table = None
    if model is not None or base_url is not None:
        table = model_table(model or "local", base_url, api_key_env)
        if table.get("provider") == "openai" and not base_url and not api_key_env:
            table["api_key_env"] = "OPENAI_API_KEY"
    job_dir = Path(os.path.abspath(output)).parent
    try:
        draft = draft_job(data, job_dir=job_dir, model=table)
        text = dumps(draft.doc, comments=draft.comments, header=(
            f"A job over {data.name}, written by llmap init. Edit the prompt and the fields, then:\n"
            f"  llmap run {output} --preview 5    answers for 5 sampled rows; writes nothing\n"
            f"  llmap run {output}                every row; Ctrl-C and run again to continue\n"
            "Every key: docs/job-spec.md"))
    except SpecError as exc:
        raise fail(exc) from None
    try:
        job_dir.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise fail(f"cannot write {output}: {exc.strerror or exc}") from None
    try:
        load_spec(output)  # what was written must load: a draft that does not is a bug to report
    except SpecError as exc:
        raise fail(f"the job written to {output} does not load ({exc}); please report this") from None
    key = (f"key {draft.key[0]!r}" if len(draft.key) == 1 else f"key {draft.key!r}") if draft.key else "no key"
    say(f"llmap: {draft.rows:,} rows; {key} ({draft.key_why}); the prompt names {len(draft.columns)} column"
        f"{'s' if len(draft.columns) != 1 else ''}: {', '.join(draft.columns)}")
    out.print(f"wrote: {os.path.normpath(output)}", highlight=False, soft_wrap=True)
    say(f"llmap: next: llmap run {output} --preview 5, then llmap run {output}")
