"""SimConfig validation, its argv form, and the ``simulate`` command's flags."""

from __future__ import annotations

import io

import pytest
import typer
from typer.testing import CliRunner

import llmap.cli.simulate as simulate_module
from llmap.sim.config import SimConfig, parse_outage
from llmap.sim.server import serve_forever


def test_parse_outage():
    assert parse_outage("5:10") == (5.0, 10.0)
    assert parse_outage("0:2.5") == (0.0, 2.5)
    for bad in ("5", "10:5", "-1:3", "a:b"):
        with pytest.raises(ValueError):
            parse_outage(bad)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fail_rate": 1.5},
        {"hang_rate": -0.1},
        {"fail_rate": 0.6, "malformed_rate": 0.6},
        {"rpm": 0},
        {"tpm": -5},
        {"header_style": "azure"},
        {"latency_median": -1},
        {"outage": (10, 5)},
        {"port": 70000},
        {"burst_s": 0},
        {"burst_s": 61},
    ],
)
def test_invalid_config_raises(kwargs):
    with pytest.raises(ValueError):
        SimConfig(**kwargs)


def test_outage_text_is_parsed_and_replace_validates():
    config = SimConfig(outage="1:2")
    assert config.outage == (1.0, 2.0)
    with pytest.raises(ValueError):
        config.replace(fail_rate=2)
    with pytest.raises(TypeError):
        config.replace(no_such_field=1)


def test_to_argv_leaves_defaults_out():
    assert SimConfig().to_argv() == []
    argv = SimConfig(port=0, rpm=60, outage=(1, 2), header_style="anthropic").to_argv()
    assert argv == [
        "--port",
        "0",
        "--rpm",
        "60",
        "--header-style",
        "anthropic",
        "--outage",
        "1.0:2.0",
    ]


def test_cli_flags_build_the_same_config(monkeypatch):
    seen: list[SimConfig] = []
    monkeypatch.setattr("llmap.sim.server.serve_forever", seen.append)  # imported when the command runs
    config = SimConfig(
        port=0,
        latency_median=0.2,
        latency_sigma=0.5,
        per_token_ms=3,
        rpm=100,
        tpm=5000,
        header_style="anthropic",
        fail_rate=0.1,
        hang_rate=0.05,
        malformed_rate=0.02,
        outage=(3, 4),
        drop_item_rate=0.1,
        corrupt_item_rate=0.2,
        require_key="sk-test",
        quota_tokens=999,
        seed=7,
        context_chars=1000,
        burst_s=1.0,
    )
    app = typer.Typer()
    app.command()(simulate_module.simulate)
    result = CliRunner().invoke(app, config.to_argv())
    assert result.exit_code == 0, result.output
    assert seen == [config]


def test_cli_rejects_bad_values(monkeypatch):
    monkeypatch.setattr("llmap.sim.server.serve_forever", lambda config: None)
    app = typer.Typer()
    app.command()(simulate_module.simulate)
    result = CliRunner().invoke(app, ["--fail-rate", "2"])
    assert result.exit_code == 2


def test_serve_forever_reports_bind_errors():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            serve_forever(SimConfig(port=port), out=io.StringIO())
