"""The image runs as an unprivileged user on a pinned base, with dependencies checked by digest.

No Docker engine is needed: the Dockerfile is read with BuildKit's own parser (the
``dockerfile`` package) and checked statically.  Building and running the image is left
to a machine with an engine.
"""

from __future__ import annotations

import re
import shlex
from pathlib import PurePosixPath

import dockerfile

from streamrec.settings import REPO_ROOT
from tests.test_compose import compose
from tests.test_locks import PLATFORM, RUNTIME_LOCK

DOCKERFILE = REPO_ROOT / "Dockerfile"
PINNED = re.compile(r"(?P<image>[\w.\-/]+):(?P<tag>\d+\.\d+\.\d+[\w.\-]*)@sha256:[0-9a-f]{64}")
# The settings naming the places the flow writes to.
WRITTEN = ("STREAMREC_STATE_DIR", "STREAMREC_RECOVERY_DIR", "STREAMREC_MODEL_DIR")


def instructions(name: str) -> list[dockerfile.Command]:
    return [c for c in dockerfile.parse_file(str(DOCKERFILE)) if c.cmd.upper() == name.upper()]


def shell_commands() -> list[list[str]]:
    """Every simple command of every RUN, split as the shell would (`a && b`: two)."""
    commands = []
    for run in instructions("RUN"):
        words = shlex.split(" ".join(run.value))
        command: list[str] = []
        for word in [*words, "&&"]:
            if word in {"&&", ";"}:
                commands.append(command)
                command = []
            else:
                command.append(word)
    return [c for c in commands if c]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in instructions("ENV"):
        pairs = instruction.value
        env |= dict(zip(pairs[::2], pairs[1::2], strict=True))
    return env


def image_user() -> tuple[int, int]:
    users = instructions("USER")
    assert users, "the image has no USER: it would run as root"
    uid, _, gid = users[-1].value[0].partition(":")
    assert uid.isdigit() and gid.isdigit(), "USER must be numeric uid:gid (runAsNonRoot checks)"
    return int(uid), int(gid)


def test_the_base_image_is_pinned_by_exact_version_and_digest() -> None:
    for base in instructions("FROM"):
        match = PINNED.fullmatch(base.value[0])
        assert match, f"{base.value[0]} is not pinned as image:X.Y.Z-...@sha256:<digest>"
        # The locks are resolved for this Python: the image must run that one.
        assert match["tag"].startswith(PLATFORM["python_version"] + "."), match["tag"]


def test_the_image_runs_as_a_fixed_unprivileged_user_it_creates() -> None:
    uid, gid = image_user()
    assert uid != 0 and gid != 0
    created = [c for c in shell_commands() if c[0] == "useradd"]
    assert any(
        c[c.index("--uid") + 1] == str(uid) and c[c.index("--gid") + 1] == str(gid) for c in created
    ), created


def test_every_pip_install_checks_digests_against_the_lock_or_fetches_nothing() -> None:
    installs = [c for c in shell_commands() if "pip" in c[:3] and "install" in c[1:4]]
    assert installs
    from_lock = [c for c in installs if "--require-hashes" in c]
    assert from_lock and all(c[c.index("-r") + 1] == RUNTIME_LOCK.name for c in from_lock)
    for command in installs:
        if command not in from_lock:
            # streamrec itself: no dependency and no build backend may come unchecked.
            assert {"--no-deps", "--no-build-isolation"} <= set(command), command
    assert any(RUNTIME_LOCK.name in copy.value for copy in instructions("COPY"))


def test_the_places_the_flow_writes_belong_to_its_user() -> None:
    uid, gid = image_user()
    owner = f"{uid}:{gid}"
    created: set[PurePosixPath] = set()  # install -d -o uid -g gid: exactly these folders
    owned_trees: set[PurePosixPath] = set()  # chown -R uid:gid: these and all below
    for command in shell_commands():
        if command[:2] == ["install", "-d"] and command[command.index("-o") + 1] == str(uid):
            assert command[command.index("-g") + 1] == str(gid), command
            created |= {PurePosixPath(p) for p in command if p.startswith("/")}
        if command[:2] == ["chown", "-R"] and command[2] == owner:
            owned_trees |= {PurePosixPath(p) for p in command[3:]}
    flow = compose()["services"]["flow"]
    volumes = [PurePosixPath(v.split(":")[1]) for v in flow.get("volumes", [])]
    written = [image_env()[name] for name in WRITTEN] + [
        flow["environment"][name] for name in WRITTEN if name in flow["environment"]
    ]
    for place in [*volumes, *map(PurePosixPath, written)]:
        assert place in created or any(place.is_relative_to(t) for t in owned_trees), (
            f"{place} is not made writable for {owner} in the Dockerfile"
        )
