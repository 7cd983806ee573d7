"""`rewardkit serve` refuses bad flags in one line (exit 2) before loading any model."""

from __future__ import annotations

import socket

import pytest

from rewardkit.cli import main


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--endpoints", "score,rank"], "--endpoints: choose from score, inspect, generate"),
        (["--host", "10.1.2.3"], "--host: 127.0.0.1, 0.0.0.0 or ::"),
        (["--model", "/no/such/folder"], "--model /no/such/folder: no such model folder"),
        (["--scorer", "nope"], "--scorer nope: unknown"),
        (["--batch-timeout", "500"], "--batch-timeout: must be >= 0 and below --timeout"),
        (["--device", "warp"], "--device warp: not a torch device"),
    ],
)
def test_bad_flags_are_one_line_errors(flags, message, capsys):
    assert main(["serve", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err


def test_a_port_in_use_is_a_one_line_error(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port), "--endpoints", "score"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"--port {port}: cannot listen on 127.0.0.1:{port}" in err
