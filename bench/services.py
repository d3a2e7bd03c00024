"""What the end-to-end benchmark starts and watches: the broker, the service under test, usage.

A *service* is the thing that turns events into recommendations: the Kafka
floor (``python -m streamrec.bench.kafka_floor``), the flow (``streamrec run``) or a
peer doing the same job in another framework (``streamrec.bench.peers``), as one or
more subprocesses configured only through ``STREAMREC_*`` variables,
exactly as a user would start them.  Their stderr goes to a log file whose
tail is shown when one of them dies or never answers.

``--pin`` keeps the broker and the service on different cores, so that on a
small machine neither preempts the other in the middle of a request:

>>> parse_pin("broker=0,flow=1", available={0, 1})
CorePin(broker=frozenset({0}), flow=frozenset({1}), harness=None)
>>> parse_pin("broker=0-1,flow=2,3", available={0, 1, 2, 3}).describe()
'broker on cores 0-1, service on cores 2-3'
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import psutil

from streamrec.settings import REPO_ROOT, Settings
from streamrec.tools.kafka_local import LocalKafka, broker_answers
from streamrec.tools.services import (
    ServiceError,
    core_list,
    free_port,
    streamrec_executable,
)

# The benchmark's failures are the services' own kind: one ``except`` catches both.
BenchError = ServiceError

FLOOR = "floor"
TEACHER = "teacher"
STUDENT = "student"
STUDENT_2PROC = "student-2proc"
QUIX = "quix-streams"
BYTEWAX_STOCK = "bytewax-stock"
# The student with another delivery or durability setting (see ``variant_settings``).
STUDENT_EXACTLY_ONCE = "student-exactly-once"
STUDENT_NO_CHANGELOG = "student-no-changelog"
# The student with /metrics on, scraped every 100 ms through the point (what a scrape costs).
STUDENT_SCRAPED = "student-scraped"
VARIANTS = (FLOOR, TEACHER, STUDENT, STUDENT_2PROC)
SETTING_VARIANTS = (STUDENT_EXACTLY_ONCE, STUDENT_NO_CHANGELOG, STUDENT_SCRAPED)
PEERS = (QUIX, BYTEWAX_STOCK)
# The version the issue compared against; the venv is updated when its pins differ.
QUIX_REQUIREMENT = "quixstreams==3.28.1"
QUIX_VENV = REPO_ROOT / "run" / "peers" / "quix-venv"
VENV_TIMEOUT_S = 900.0
# What the peers score with, besides their framework (the versions of this environment).
SCORING_PACKAGES = ("onnxruntime", "numpy", "orjson")
PIN_ROLES = ("broker", "flow", "harness")


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


def service_commands(variant: str, workers: int = 1) -> list[list[str]]:
    """The command line of each process of ``variant`` (two for ``student-2proc``)."""
    if variant == FLOOR:
        return [[sys.executable, "-m", "streamrec.bench.kafka_floor"]]
    if variant == BYTEWAX_STOCK:
        return [[sys.executable, "-m", "bytewax.run", "streamrec.bench.peers.bytewax_peer:flow"]]
    if variant == QUIX:
        return [[str(QUIX_VENV / "bin" / "python"), "-m", "streamrec.bench.peers.quix_peer"]]
    run = [streamrec_executable(), "run", "-w", str(workers)]
    if variant == TEACHER:
        return [[*run, "--variant", TEACHER]]
    if variant in (STUDENT, *SETTING_VARIANTS):
        return [run]  # the card's chosen variant; the settings differ in the environment
    if variant == STUDENT_2PROC:
        addresses = ";".join(f"127.0.0.1:{free_port()}" for _ in range(2))
        return [[*run, "-i", str(i), "-a", addresses] for i in range(2)]
    known = ", ".join((*VARIANTS, *SETTING_VARIANTS, *PEERS))
    raise BenchError(f"unknown variant {variant!r} (known: {known})")


def ensure_quix_venv(log: Callable[[str], None], venv: Path = QUIX_VENV) -> Path:
    """A virtual environment with Quix Streams and the scoring libraries; made once, from PyPI.

    Quix Streams pins confluent-kafka below 2.13, which this project's
    environment is above, so the peer cannot run here.  onnxruntime and numpy
    are pinned to this environment's versions: both sides score alike.  This
    repository is installed in it too (editable, without its dependencies): its
    folders import as ``streamrec.bench``, ``streamrec.model``, ... only once installed.
    """
    python = venv / "bin" / "python"
    requirements = [QUIX_REQUIREMENT, *(f"{name}=={version(name)}" for name in SCORING_PACKAGES)]
    this_repository = ["--no-deps", "-e", str(REPO_ROOT)]
    wanted = [*requirements, *this_repository]
    stamp = venv / "streamrec-requirements.txt"
    if python.exists() and stamp.exists() and stamp.read_text().split() == wanted:
        return python
    log(f"creating {venv} for the Quix Streams peer: {' '.join(wanted)}")
    try:
        if not python.exists():
            subprocess.run(
                [sys.executable, "-m", "venv", str(venv)],
                check=True,
                capture_output=True,
                timeout=VENV_TIMEOUT_S,
            )
        for packages in (requirements, this_repository):
            subprocess.run(
                [str(python), "-m", "pip", "install", "--quiet", *packages],
                check=True,
                capture_output=True,
                timeout=VENV_TIMEOUT_S,
            )
    except subprocess.CalledProcessError as err:
        tail = (err.stderr or b"").decode(errors="replace").strip().splitlines()[-5:]
        raise BenchError(
            f"{QUIX}: could not install {' '.join(wanted)} into {venv} (PyPI must be "
            "reachable):\n" + "\n".join(tail)
        ) from None
    except subprocess.TimeoutExpired:
        raise BenchError(
            f"{QUIX}: installing into {venv} took over {VENV_TIMEOUT_S:.0f} s"
        ) from None
    stamp.write_text("\n".join(wanted) + "\n")
    return python


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


@dataclass(frozen=True, slots=True)
class CorePin:
    """Which cores the broker, the service under test and (optionally) the harness may use."""

    broker: frozenset[int]
    flow: frozenset[int]
    harness: frozenset[int] | None = None

    def describe(self) -> str:
        text = f"broker on cores {core_list(self.broker)}, service on cores {core_list(self.flow)}"
        if self.harness is not None:
            text += f", load generator and latency collector on {core_list(self.harness)}"
        return text


def parse_pin(text: str, available: Collection[int] | None = None) -> CorePin:
    """``broker=0,flow=1`` (also ``broker=0-1,flow=2,3``, ``harness=...``) as a ``CorePin``.

    Refused (``ValueError``, saying what to do) when fewer than two cores are
    available to this process, a core is not among them, a role is unknown or
    missing, or the broker and the service would share a core.
    """
    usable = set(os.sched_getaffinity(0) if available is None else available)
    if len(usable) < 2:
        raise ValueError(
            f"pinning needs at least 2 cores, and this process may use {len(usable)} "
            f"({core_list(usable) if usable else 'none'}); run without --pin"
        )
    roles: dict[str, set[int]] = {}
    role: str | None = None
    for word in (w.strip() for w in text.split(",")):
        if not word:
            continue
        if "=" in word:
            role, _, word = (part.strip() for part in word.partition("="))
            if role not in PIN_ROLES:
                raise ValueError(f"unknown role {role!r} in --pin; use {', '.join(PIN_ROLES)}")
            if role in roles:
                raise ValueError(f"{role} is named twice in --pin")
            roles[role] = set()
        if role is None:
            raise ValueError(f"--pin takes role=cores, e.g. broker=0,flow=1; got {text!r}")
        roles[role] |= _cores(word)
    missing = [r for r in ("broker", "flow") if r not in roles]
    if missing:
        raise ValueError(f"--pin needs {' and '.join(missing)}=CORES, e.g. broker=0,flow=1")
    for name, cores in roles.items():
        if not cores <= usable:
            raise ValueError(
                f"--pin {name}={core_list(cores)}: core(s) {core_list(cores - usable)} are not "
                f"available here (this process may use {core_list(usable)})"
            )
    shared = roles["broker"] & roles["flow"]
    if shared:
        raise ValueError(
            f"--pin puts the broker and the service both on core(s) {core_list(shared)}: "
            "give them different cores"
        )
    harness = roles.get("harness")
    return CorePin(
        frozenset(roles["broker"]),
        frozenset(roles["flow"]),
        frozenset(harness) if harness is not None else None,
    )


def _cores(word: str) -> set[int]:
    try:
        if "-" in word:
            low, high = (int(part) for part in word.split("-", 1))
            if low > high:
                raise ValueError
            return set(range(low, high + 1))
        return {int(word)}
    except ValueError:
        raise ValueError(f"--pin: {word!r} is not a core number or a range like 0-1") from None


class Pinning:
    """Threads of some processes moved onto given cores, and how to give them back.

    ``sched_setaffinity`` moves one thread, so each thread of a running
    process (the broker's JVM has dozens) is moved; threads it creates later
    inherit the setting from their creator, so ``restore`` gives those the
    cores their process had.
    """

    def __init__(self) -> None:
        self.before: dict[int, set[int]] = {}
        self.processes: dict[int, set[int]] = {}

    def pin(self, pid: int, cores: Collection[int]) -> None:
        """Every thread of ``pid`` and of its descendants onto ``cores``."""
        try:
            root = psutil.Process(pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            raise BenchError(f"cannot pin process {pid}: it is gone") from None
        for process in tree:
            for tid in _threads(process.pid):
                try:
                    original = os.sched_getaffinity(tid)
                    os.sched_setaffinity(tid, set(cores))
                except ProcessLookupError:
                    continue  # a thread that ended meanwhile
                except PermissionError:
                    raise BenchError(
                        f"cannot pin process {pid} ({process.name()}): not allowed; run the "
                        "benchmark as its owner, or without --pin"
                    ) from None
                self.before.setdefault(tid, original)
                if tid == process.pid:
                    self.processes.setdefault(process.pid, original)

    def restore(self) -> None:
        """Each thread back on the cores it had; one born meanwhile, on its process's."""
        for pid, cores in self.processes.items():
            for tid in _threads(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.sched_setaffinity(tid, self.before.get(tid, cores))


def _threads(pid: int) -> list[int]:
    try:
        return [int(name) for name in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []
