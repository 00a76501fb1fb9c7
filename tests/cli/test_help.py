"""``llmap --version`` and a ``--help`` that teaches: no ``<bool>`` after a flag, no ``[text]`` eaten as markup."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

import llmap
from llmap.cli import app

runner = CliRunner()


def _commands(t: typer.Typer, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix]
    for c in t.registered_commands:
        out.append((*prefix, c.name or c.callback.__name__))
    for g in t.registered_groups:
        out += _commands(g.typer_instance, (*prefix, g.name))
    return out


COMMANDS = _commands(app)


def _help(args: tuple[str, ...]) -> str:
    res = runner.invoke(app, [*args, "--help"], terminal_width=200, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    return res.stdout


def test_version_prints_the_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == f"llmap {llmap.__version__}"


def test_every_command_has_help():
    assert {"init", "run", "status", "export", "report", "estimate", "simulate"} <= {c[-1] for c in COMMANDS if c}
    assert ("cache", "stats") in COMMANDS and ("batch", "cancel") in COMMANDS


@pytest.mark.parametrize("args", COMMANDS, ids=lambda c: " ".join(c) or "llmap")
def test_flags_show_no_value(args):
    text = _help(args)
    assert "<bool>" not in text


def _raw_help(args: tuple[str, ...]) -> list[str]:
    cmd = typer.main.get_command(app)
    for a in args:
        cmd = cmd.commands[a]
    texts = [cmd.help or ""]
    texts += [getattr(p, "help", None) or "" for p in cmd.params]
    return texts


@pytest.mark.parametrize("args", COMMANDS, ids=lambda c: " ".join(c) or "llmap")
def test_brackets_in_help_texts_survive_rich_markup(args):
    # 'llmap[ray]' was shown as 'llmap': Rich took [ray] for a style
    text = " ".join(_help(args).split())
    for raw in _raw_help(args):
        for word in re.findall(r"\\?\[([a-z_.]+)\]", raw):
            assert f"[{word}]" in text, f"[{word}] was eaten in {' '.join(args)} --help"


def test_run_help_shows_the_ray_extra_and_the_three_ways_to_start():
    text = " ".join(_help(("run",)).split())
    assert "pip install 'llmap[ray]'" in text
    assert "--preview" in text and "--prompt" in text and "--field" in text and "llmap init DATA" in text


def test_fresh_says_the_cache_still_answers_and_no_cache_asks_again():
    text = " ".join(_help(("run",)).split())
    assert "Answers still come from the response cache" in text and "--no-cache" in text
