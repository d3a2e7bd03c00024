"""What the end-to-end benchmark starts and watches: the broker, the service under test, usage.

A *service* is the thing that turns events into recommendations: the Kafka
floor (``python -m tools.kafka_floor``) or the flow (``streamrec run``), as
one or more subprocesses configured only through ``STREAMREC_*`` variables,
exactly as a user would start them.  Their stderr goes to a log file whose
tail is shown when one of them dies or never answers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from streamrec.settings import Settings
from tools.kafka_local import LocalKafka, broker_answers

FLOOR = "floor"
TEACHER = "teacher"
STUDENT = "student"
STUDENT_2PROC = "student-2proc"
VARIANTS = (FLOOR, TEACHER, STUDENT, STUDENT_2PROC)
STOP_TIMEOUT_S = 20.0


class BenchError(RuntimeError):
    """The benchmark cannot go on; the message says what failed and what to look at."""


@dataclass(slots=True)
class Broker:
    """The broker the benchmark talks to; ``local`` is set when the benchmark started it."""

    bootstrap: str
    pid: int | None
    local: LocalKafka | None = None

    def stop(self) -> None:
        if self.local is not None:
            self.local.down()


def ensure_broker(settings: Settings, log: Callable[[str], None]) -> Broker:
    """The broker at ``settings.brokers``; the local one is started when nothing answers there."""
    local = LocalKafka(settings, log=log)
    status = local.status()
    if status.running and status.bootstrap == settings.brokers:
        return Broker(settings.brokers, status.pid)
    if broker_answers(settings.brokers, timeout_s=5):
        return Broker(settings.brokers, _listening_pid(settings.brokers))
    if settings.brokers != local.bootstrap:
        raise BenchError(
            f"no Kafka answers at {settings.brokers}, and it is not the local broker's address "
            f"({local.bootstrap}) that the benchmark could start; start it, or unset "
            "STREAMREC_BROKERS to use the local one"
        )
    status = local.up()
    return Broker(settings.brokers, status.pid, local)


def _listening_pid(bootstrap: str) -> int | None:
    """The process listening on the broker's port, to measure its CPU; None if not visible."""
    port = int(bootstrap.split(",")[0].rsplit(":", 1)[1])
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                return conn.pid
    except psutil.AccessDenied:
        pass
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def streamrec_executable() -> str:
    """The ``streamrec`` script of this interpreter's environment (the flow runs from it)."""
    beside = Path(sys.executable).with_name("streamrec")
    found = str(beside) if beside.exists() else shutil.which("streamrec")
    if found is None:
        raise BenchError(
            "the `streamrec` command was not found next to this Python; install the package "
            "(`pip install -e .`) in this environment"
        )
    return found


def service_commands(variant: str, workers: int = 1) -> list[list[str]]:
    """The command line of each process of ``variant`` (two for ``student-2proc``)."""
    if variant == FLOOR:
        return [[sys.executable, "-m", "tools.kafka_floor"]]
    run = [streamrec_executable(), "run", "-w", str(workers)]
    if variant == TEACHER:
        return [[*run, "--variant", TEACHER]]
    if variant == STUDENT:
        return [run]  # the flow serves the model card's chosen variant by default
    if variant == STUDENT_2PROC:
        addresses = ";".join(f"127.0.0.1:{free_port()}" for _ in range(2))
        return [[*run, "-i", str(i), "-a", addresses] for i in range(2)]
    raise BenchError(f"unknown variant {variant!r} (known: {', '.join(VARIANTS)})")


def service_environment(settings: Settings) -> dict[str, str]:
    """The environment of a service: this one, with every setting made explicit."""
    return {**os.environ, **settings.to_env()}


class Service:
    """The running processes of one variant; ``stop`` ends them all (SIGTERM, then SIGKILL)."""

    def __init__(
        self, variant: str, commands: Sequence[Sequence[str]], env: dict[str, str], log_path: Path
    ) -> None:
        self.variant = variant
        self.commands = [list(c) for c in commands]
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

    def failure(self, what: str) -> BenchError:
        exited = ", ".join(f"pid {pid} exited with {code}" for pid, code in self.exited())
        return BenchError(
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


@dataclass(frozen=True, slots=True)
class Usage:
    """CPU seconds and resident memory of some processes (with their children) at one moment."""

    cpu_s: float
    rss_mb: float


def usage_of(pids: Sequence[int | None], children: bool = True) -> Usage:
    """Summed over the processes (and their descendants); vanished processes count as 0."""
    cpu = rss = 0.0
    for pid in pids:
        if pid is None:
            continue
        try:
            root = psutil.Process(pid)
            tree = [root, *(root.children(recursive=True) if children else [])]
        except psutil.NoSuchProcess:
            continue
        for process in tree:
            try:
                times = process.cpu_times()
                cpu += times.user + times.system
                rss += process.memory_info().rss
            except psutil.NoSuchProcess:
                continue
    return Usage(cpu, rss / 2**20)


def machine_cpu_s() -> float:
    """CPU seconds all cores have spent busy since boot (to see what else ran meanwhile)."""
    times = psutil.cpu_times()
    busy = ("user", "nice", "system", "irq", "softirq")
    return float(sum(getattr(times, name, 0.0) for name in busy))
