"""Streamrec and its peers as running processes, as a user would start them; and readiness.

A *service* is one or more subprocesses configured only through ``STREAMREC_*``
variables, exactly as a user would start them, whose output goes to a log file
whose tail is shown when one of them dies or never answers.  The demo starts
the flow as one; the benchmarks (``bench/``) start the flow, its variants, the
Kafka floor and the peers the same way.

>>> core_list({0, 1, 2, 5})
'0-2,5'
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tqdm import tqdm

from streamrec.contracts import Event
from streamrec.kafka_clients import KafkaUnavailable
from streamrec.settings import Settings
from streamrec.tools.latency import LatencyCollector
from streamrec.tools.replay import DatasetSource, KafkaSender

STOP_TIMEOUT_S: Final = 20.0
# Readiness: a probe every half second until the first answer, then a few at this rate.
PROBE_INTERVAL_S: Final = 0.5
WARMUP_RATE: Final = 200.0
COLLECTOR_ATTEMPTS: Final = 3


class ServiceError(RuntimeError):
    """A service cannot go on; the message says what failed and what to look at."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def streamrec_executable() -> str:
    """The ``streamrec`` script of this interpreter's environment (the flow runs from it)."""
    beside = Path(sys.executable).with_name("streamrec")
    found = str(beside) if beside.exists() else shutil.which("streamrec")
    if found is None:
        raise ServiceError(
            "the `streamrec` command was not found next to this Python; install the package "
            "(`pip install -e .`) in this environment"
        )
    return found


def service_environment(settings: Settings) -> dict[str, str]:
    """The environment of a service: this one, with every setting made explicit."""
    return {**os.environ, **settings.to_env()}


class Service:
    """The running processes of one variant; ``stop`` ends them all (SIGTERM, then SIGKILL)."""

    def __init__(
        self,
        variant: str,
        commands: Sequence[Sequence[str]],
        env: dict[str, str],
        log_path: Path,
        cores: Collection[int] | None = None,
    ) -> None:
        self.variant = variant
        # taskset pins before the interpreter starts, so every thread it creates inherits it.
        prefix = ["taskset", "-c", core_list(cores)] if cores else []
        self.commands = [[*prefix, *c] for c in commands]
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        self.processes: list[subprocess.Popen[bytes]] = []
        for command in self.commands:
            self._log.write(f"$ {' '.join(command)}\n".encode())
            self._log.flush()
            self.processes.append(
                subprocess.Popen(
                    command,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=self._log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own group: stop() reaches its children too
                )
            )

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def exited(self) -> list[tuple[int, int]]:
        """(pid, exit code) of each process that has ended."""
        return [(p.pid, code) for p in self.processes if (code := p.poll()) is not None]

    def log_tail(self, lines: int = 40) -> str:
        self._log.flush()
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no output)"
        return "\n".join(text.splitlines()[-lines:]) or "(no output)"

    def failure(self, what: str) -> ServiceError:
        exited = ", ".join(f"pid {pid} exited with {code}" for pid, code in self.exited())
        return ServiceError(
            f"{self.variant}: {what}{f' ({exited})' if exited else ''}.\n"
            f"command: {' '.join(self.commands[0])}\n"
            f"--- last lines of {self.log_path} ---\n{self.log_tail()}"
        )

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        for process in self.processes:
            _signal_group(process, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait(5.0)
        self._log.close()


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


def core_list(cores: Collection[int]) -> str:
    """``{0, 1, 2, 5}`` as ``0-2,5`` (taskset's and the kernel's notation)."""
    ordered = sorted(cores)
    spans: list[str] = []
    start = previous = ordered[0]
    for core in [*ordered[1:], None]:
        if core is not None and core == previous + 1:
            previous = core
            continue
        spans.append(str(start) if start == previous else f"{start}-{previous}")
        if core is not None:
            start = previous = core
    return ",".join(spans)


def flow_commands(workers: int = 1) -> list[list[str]]:
    """The command line of a flow serving the card's chosen variant, as ``Service`` takes it."""
    return [[streamrec_executable(), "run", "-w", str(workers)]]


@dataclass(frozen=True, slots=True)
class Readiness:
    """How a service is judged ready: ``warmup_events`` answered within ``timeout_s``."""

    warmup_events: int = 200
    timeout_s: float = 180.0


def latency_collector(settings: Settings, group: str) -> LatencyCollector:
    """A collector at the topics' current ends, asked again while the broker is slow to say.

    Reading the ends takes one request per partition, each given a few
    seconds; a broker starved of CPU can take longer.  Nothing is sent before
    the collector exists, so asking again costs no figure.
    """
    attempt = 1
    while True:
        try:
            return LatencyCollector(settings, group=group)
        except KafkaUnavailable as err:
            if attempt == COLLECTOR_ATTEMPTS:
                raise
            attempt += 1
            tqdm.write(f"the broker was slow to answer ({err}); asking again")


def wait_until_serving(
    settings: Settings, service: Service, events: list[Event], start: int, ready: Readiness
) -> int:
    """Probe until the service answers, then check it answers a few; returns the next position.

    One event every half second until the first recommendation comes back
    (the service may still be loading its model, or may start reading at the
    end of the topic), then ``ready.warmup_events`` at a modest rate, all of
    which must be answered.
    """
    source = DatasetSource(events, start, count=sys.maxsize)
    collector = latency_collector(settings, "streamrec-bench-ready")
    sender = KafkaSender(settings, settings.events_topic)
    sender.warm_up()
    deadline = time.monotonic() + ready.timeout_s
    sent = 0

    def check(what: str) -> None:
        if service.exited():
            raise service.failure(f"exited before answering {what}")
        if time.monotonic() > deadline:
            raise service.failure(f"did not answer {what} within {ready.timeout_s:.0f} s")

    try:
        next_probe = 0.0
        while collector.matcher.stats.matched == 0:
            check("its first event")
            if time.monotonic() >= next_probe:
                sender.send(source.record(sent))
                sent += 1
                next_probe = time.monotonic() + PROBE_INTERVAL_S
            collector.poll(0.05)
        warmup_ids = []
        for _ in range(ready.warmup_events):
            sender.send(source.record(sent))
            warmup_ids.append(source.event(sent).event_id)
            sent += 1
            collector.poll(1.0 / WARMUP_RATE)
        while not all(collector.matcher.is_matched(i) for i in warmup_ids):
            check(f"all {ready.warmup_events} warm-up events")
            collector.poll(0.1)
    finally:
        sender.finish(5.0)
        collector.close()
    return start + sent
