"""The `streamrec` commands as a user meets them, in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("command", "exit_code"),
    [
        (["replay", "--count", "1", "--no-progress"], 1),
        # The flow's own code for "Kafka is not there": a supervisor restarts it later.
        (["run"], 69),
        (["latency", "--count", "1"], 1),
        (["topics", "create"], 1),
    ],
)
def test_without_a_broker_the_commands_say_so_once_without_client_log_noise(
    command: list[str], exit_code: int
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "streamrec", *command],
        env={**os.environ, "STREAMREC_BROKERS": "127.0.0.1:1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == exit_code
    output = done.stdout + done.stderr
    errors = [line for line in output.splitlines() if "streamrec kafka up" in line]
    assert len(errors) == 1, output
    assert "%3|" not in output  # librdkafka's own connection-refused lines
    assert "listening" not in output  # no claim of a success before the failure


def test_every_command_and_benchmark_loads_as_a_click_command() -> None:
    import click

    from streamrec.cli import BENCH_COMMANDS, COMMANDS

    for name, (load, summary) in [*COMMANDS.items(), *BENCH_COMMANDS.items()]:
        assert isinstance(load(), click.Command), name
        assert summary.endswith("."), name
