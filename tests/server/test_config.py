"""Server configuration: flags, GRADWIRE_* defaults and the momentum rule."""

from __future__ import annotations

import argparse

import pytest

from gradwire.server.config import ServerConfig, add_server_flags, parse_momentum


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_server_flags(parser)
    return parser.parse_args(argv)


def test_momentum_flag_accepts_auto_and_numbers():
    assert parse_momentum("auto") is None and parse_momentum(None) is None
    assert parse_momentum("0") == 0.0 and parse_momentum(0.9) == 0.9
    for bad in ("1", "-0.1", "fast"):
        with pytest.raises(ValueError):
            parse_momentum(bad)
    assert _parse([]).momentum is None
    assert _parse(["--momentum", "0.5"]).momentum == 0.5


def test_momentum_environment_default(monkeypatch):
    monkeypatch.setenv("GRADWIRE_MOMENTUM", "0.25")
    assert _parse([]).momentum == 0.25
    monkeypatch.setenv("GRADWIRE_MOMENTUM", "auto")
    assert _parse([]).momentum is None


def test_server_momentum_rule():
    auto = ServerConfig()
    assert auto.server_momentum(worker_momentum=0.0) == 0.9
    assert auto.server_momentum(worker_momentum=0.9) == 0.0
    assert ServerConfig(momentum=0.3).server_momentum(worker_momentum=0.9) == 0.3
    with pytest.raises(ValueError, match="momentum"):
        ServerConfig(momentum=1.5)
