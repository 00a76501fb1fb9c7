"""The simulator as a child process: start, talk, stop."""

from __future__ import annotations

import urllib.error

import pytest

from llmap.sim import SimulatorStartError, start_simulator_process


def test_start_talk_and_stop(post_chat, chat_body):
    with start_simulator_process(rpm=1, seed=1) as sim:
        assert sim.base_url.startswith("http://127.0.0.1:") and sim.base_url.endswith("/v1")
        assert post_chat(sim, chat_body()).status == 200
        assert post_chat(sim, chat_body()).status == 429
        stats = sim.stats()
        assert stats["requests"] == 2
        assert stats["by_status"] == {"200": 1, "429": 1}
        sim.reconfigure(rpm=None)
        assert post_chat(sim, chat_body()).status == 200
        assert sim.reset_stats()["requests"] == 0
        popen = sim.popen
    assert popen.poll() is not None  # stopped on leaving the block
    with pytest.raises(urllib.error.URLError):
        sim.stats()
    sim.stop()  # idempotent


def test_start_failure_is_reported():
    with pytest.raises(SimulatorStartError):
        start_simulator_process(python="/bin/false", startup_timeout=10)


def test_config_is_validated_before_starting():
    with pytest.raises(ValueError):
        start_simulator_process(fail_rate=2)
