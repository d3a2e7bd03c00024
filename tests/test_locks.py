"""The lock files pin, with digests, exactly what pyproject.toml asks for.

``make demo`` installs requirements.lock and ``make test`` requirements-dev.lock, with pip's
``--require-hashes``; ``make lock`` regenerates both from pyproject.toml.  These checks read
the files only (no index is asked), so they fail at once when someone edits pyproject's
dependencies and forgets ``make lock``.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_LOCK = ROOT / "requirements.lock"
DEV_LOCK = ROOT / "requirements-dev.lock"
LOCKED_EXTRAS = ("dev", "train")
# What the locks are resolved for (LOCK_PLATFORM in the Makefile), to evaluate markers.
PLATFORM = {"sys_platform": "linux", "platform_machine": "x86_64", "python_version": "3.11"}
# uv's annotation for a requirement that pyproject.toml itself names.
FROM_PYPROJECT = "streamrec (pyproject.toml)"
SHA256 = re.compile(r"--hash=sha256:([0-9a-f]{64})")


@dataclass(frozen=True, slots=True)
class Pin:
    name: str
    version: str
    hashes: frozenset[str]
    via: frozenset[str]


def read_lock(path: Path) -> dict[str, Pin]:
    """The pins of a uv-compiled lock, by canonical name.

    >>> pins = read_lock(RUNTIME_LOCK)
    >>> pins["bytewax"].version
    '0.21.1'
    """
    pins: dict[str, Pin] = {}
    # One entry is its requirement line, continued with `\\`, then its `# via` comment lines.
    for entry in re.split(r"\n(?=\S)", path.read_text()):
        head, *comments = entry.split("\n    #")
        if head.startswith("#") or not head.strip():
            continue
        requirement, *_ = head.split(" \\", 1)
        name, separator, version = requirement.partition("==")
        assert separator, f"{path.name}: {requirement!r} is not pinned with =="
        # "# via X", or "# via" followed by one "#   X" line per source.
        sources = [line.strip() for line in comments]
        if sources:
            sources[0] = sources[0].removeprefix("via").strip()
        pins[canonicalize_name(name)] = Pin(
            name=name,
            version=version,
            hashes=frozenset(SHA256.findall(head)),
            via=frozenset(filter(None, sources)),
        )
    return pins


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirements(*extras: str) -> list[Requirement]:
    """pyproject's dependencies and those of ``extras`` that apply to the locked platform."""
    project = pyproject()["project"]
    lines = [*project["dependencies"]]
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    wanted = [Requirement(line) for line in lines]
    return [r for r in wanted if r.marker is None or r.marker.evaluate(PLATFORM)]


def build_requirements() -> list[Requirement]:
    return [Requirement(line) for line in pyproject()["build-system"]["requires"]]


LOCKS = {
    RUNTIME_LOCK.name: (RUNTIME_LOCK, ()),
    DEV_LOCK.name: (DEV_LOCK, LOCKED_EXTRAS),
}


@pytest.mark.parametrize("lock", LOCKS)
def test_every_locked_package_is_pinned_to_one_version_with_its_digests(lock: str) -> None:
    path, _ = LOCKS[lock]
    pins = read_lock(path)
    assert pins
    for pin in pins.values():
        assert re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", pin.version), pin
        assert pin.hashes, f"{lock}: {pin.name}=={pin.version} has no sha256 digest"
    # Every requirement line carries its digests: pip's --require-hashes needs all of them.
    text = path.read_text()
    assert len(re.findall(r"^\S+==\S+ \\$", text, flags=re.M)) == len(pins)


@pytest.mark.parametrize("lock", LOCKS)
def test_every_requirement_of_pyproject_is_pinned_within_its_range(lock: str) -> None:
    path, extras = LOCKS[lock]
    pins = read_lock(path)
    for requirement in [*requirements(*extras), *build_requirements()]:
        pin = pins.get(canonicalize_name(requirement.name))
        assert pin is not None, f"{lock} lacks {requirement}: run `make lock`"
        assert requirement.specifier.contains(pin.version, prereleases=True), (
            f"{lock} pins {pin.name}=={pin.version}, outside pyproject's {requirement}: "
            "run `make lock`"
        )


@pytest.mark.parametrize("lock", LOCKS)
def test_the_lock_names_as_direct_requirements_exactly_pyprojects(lock: str) -> None:
    # A dependency dropped from pyproject must leave the lock too.
    path, extras = LOCKS[lock]
    direct = {name for name, pin in read_lock(path).items() if FROM_PYPROJECT in pin.via}
    assert direct == {canonicalize_name(r.name) for r in requirements(*extras)}


def test_the_runtime_lock_is_the_dev_locks_share_so_the_tests_test_those_versions() -> None:
    dev = read_lock(DEV_LOCK)
    for name, pin in read_lock(RUNTIME_LOCK).items():
        assert name in dev, f"{pin.name} is in the runtime lock only: run `make lock`"
        assert (pin.version, pin.hashes) == (dev[name].version, dev[name].hashes), name


def test_the_runtime_lock_holds_no_training_or_test_tools() -> None:
    runtime = read_lock(RUNTIME_LOCK)
    only_dev = {canonicalize_name(r.name) for r in requirements(*LOCKED_EXTRAS)} - {
        canonicalize_name(r.name) for r in requirements()
    }
    assert only_dev and not only_dev & set(runtime)
