"""The expected sha256 digests of the local broker's jars, and the check against them.

tools/kafka_jars.sha256 lists, in ``sha256sum`` format, every jar of each pinned broker
set by its path under the jars cache (``kafka-4.3.1/kafka-clients-4.3.1.jar``), so that
``sha256sum -c`` run in ``settings.kafka_jars_dir`` checks a cache by hand too.  The digests
are recorded by ``streamrec kafka digests`` from jars that Maven downloaded afresh from
Maven Central, each checked there against Central's published checksum.  ``ensure_jars``
(tools/kafka_local.py) checks every jar against them before the broker runs any.

>>> lines = ["# a comment", "ab" * 32 + "  kafka-4.3.1/kafka-clients-4.3.1.jar"]
>>> parse_digests(lines)["kafka-4.3.1"]
{'kafka-clients-4.3.1.jar': 'abababababababababababababababababababababababababababababababab'}
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

DIGESTS_FILE = Path(__file__).with_name("kafka_jars.sha256")
_LINE = re.compile(r"(?P<digest>[0-9a-f]{64}) [ *](?P<folder>[^/\s]+)/(?P<jar>[^/\s]+\.jar)")
_HEADER = (
    "# sha256 of every jar of the local broker (tools/kafka_local.py), by its path under the\n"
    "# jars cache (settings.kafka_jars_dir). Recorded by `streamrec kafka digests` from jars\n"
    "# Maven downloaded afresh from Maven Central with --strict-checksums (each checked\n"
    "# against Central's published checksum there); checked before the broker runs any.\n"
)


class DigestsFileError(ValueError):
    """A line of the digests file is not ``<sha256>  <folder>/<name>.jar``."""


def parse_digests(lines: Iterable[str]) -> dict[str, dict[str, str]]:
    """Folder (``kafka-4.3.1``) -> jar name -> sha256, from ``sha256sum`` lines."""
    sets: dict[str, dict[str, str]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = _LINE.fullmatch(line.rstrip("\n"))
        if match is None:
            raise DigestsFileError(f"line {number}: {line!r} is not '<sha256>  <folder>/<jar>'")
        sets.setdefault(match["folder"], {})[match["jar"]] = match["digest"]
    return sets


def expected_digests(folder: str, digests_file: Path = DIGESTS_FILE) -> dict[str, str]:
    """Jar name -> sha256 of the set cached as ``folder``; empty when none was recorded."""
    if not digests_file.exists():
        return {}
    return parse_digests(digests_file.read_text().splitlines()).get(folder, {})


def sha256_of(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def jar_digests(folder: Path) -> dict[str, str]:
    """Jar name -> sha256 of every jar in ``folder``."""
    return {jar.name: sha256_of(jar) for jar in sorted(folder.glob("*.jar"))}


def mismatches(found: Mapping[str, str], expected: Mapping[str, str]) -> list[str]:
    """What differs between the jars ``found`` and ``expected``, one line per jar.

    >>> mismatches({"a.jar": "1" * 64, "b.jar": "2" * 64}, {"a.jar": "1" * 64, "c.jar": "3" * 64})
    ['b.jar: not in the recorded set', 'c.jar: missing']
    """
    problems = []
    for name in sorted(found.keys() | expected.keys()):
        if name not in expected:
            problems.append(f"{name}: not in the recorded set")
        elif name not in found:
            problems.append(f"{name}: missing")
        elif found[name] != expected[name]:
            problems.append(f"{name}: sha256 {found[name]}, expected {expected[name]}")
    return problems


def record_digests(folder: Path, digests_file: Path = DIGESTS_FILE) -> int:
    """Write the digests of ``folder``'s jars as its set, keeping the other sets; the count."""
    sets = parse_digests(digests_file.read_text().splitlines()) if digests_file.exists() else {}
    sets[folder.name] = jar_digests(folder)
    body = "".join(
        f"{digest}  {name}/{jar}\n"
        for name in sorted(sets)
        for jar, digest in sorted(sets[name].items())
    )
    digests_file.write_text(_HEADER + body)
    return len(sets[folder.name])
