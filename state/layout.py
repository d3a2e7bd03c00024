"""Where session state lives on disk, and the partition count it was made for.

The store's unit is a shard: shard ``i`` of ``n`` holds the sessions of the
users whose events arrive on partition ``i`` of the events topic's ``n``
partitions.  Producers key events by user, so all of a user's events land on one
partition, and Bytewax reads each partition on exactly one worker, which opens
that partition's shard.  A state directory holds one RocksDB per shard,
``shard-<index>``, and ``LAYOUT.json``, which records the state format version
and the shard count.

How many workers or processes run does not matter: with more or fewer of them,
each partition, and so each shard, is still read by one worker, so the same
directory serves them all with no migration.  The partition count of the events
topic does matter: the producer's partitioner picks a user's partition from a
hash of the key and the partition count, so with another count users would move
to other partitions and find their sessions in the wrong shard.  A directory
made for one partition count is refused for any other, never silently reused.
Each shard DB also records its own index and the shard count, so that a DB
renamed or moved to another directory is refused too.

>>> import tempfile
>>> d = Path(tempfile.mkdtemp())
>>> ensure_layout(d, shard_count=2)
Layout(format_version=1, shard_count=2)
>>> ensure_layout(d, shard_count=3)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
streamrec.state.errors.IncompatibleStateError: state directory ... was laid out for 2 shards ...
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import orjson

from streamrec.state.errors import IncompatibleStateError, StateNotFoundError, TopicIncarnationError

STATE_FORMAT_VERSION: Final = 1
LAYOUT_FILE: Final = "LAYOUT.json"
_SHARD_DIR: Final = re.compile(r"shard-(\d+)")
_WHY_REFUSED: Final = (
    "A topic's partition count decides which partition (and so which shard) holds a user, "
    "so this state cannot be used"
)
_REBUILT: Final = "(sessions are rebuilt by replaying the events)"


@dataclass(frozen=True, slots=True)
class Layout:
    """The format version and shard count (the events topic's partitions) of a state directory."""

    format_version: int
    shard_count: int

    def describe(self) -> str:
        return (
            f"{_many(self.shard_count, 'shard')}, one per partition of the events topic "
            f"(state format {self.format_version})"
        )


def shard_dir(state_dir: Path, shard_index: int) -> Path:
    """The RocksDB directory of shard ``shard_index`` (partition ``shard_index``'s users)."""
    return state_dir / f"shard-{shard_index}"


def existing_shards(state_dir: Path) -> list[int]:
    """The indices of the shard DBs present in ``state_dir``, ascending."""
    if not state_dir.is_dir():
        return []
    found = (_SHARD_DIR.fullmatch(p.name) for p in state_dir.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


def ensure_layout(state_dir: Path, shard_count: int) -> Layout:
    """The layout of ``state_dir``, recorded if new; another format or shard count is refused.

    ``shard_count`` is the number of partitions of the events topic.
    """
    expected = Layout(STATE_FORMAT_VERSION, shard_count)
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LAYOUT_FILE
    if not path.exists():
        strays = [i for i in existing_shards(state_dir) if i >= shard_count]
        if strays:
            raise IncompatibleStateError(
                f"state directory {state_dir} has no {LAYOUT_FILE} but holds shard-{strays[-1]}, "
                f"so it was made for an events topic of at least {strays[-1] + 1} partitions; "
                f"the events topic now has {_many(shard_count, 'partition')}. {_WHY_REFUSED}: "
                "recreate the topic with the partition count the state was made for, or start "
                f"from an empty --state-dir {_REBUILT}."
            )
        _create_exclusively(path, orjson.dumps(_layout_doc(expected), option=orjson.OPT_INDENT_2))
    found = read_layout(state_dir)
    if found != expected:
        raise IncompatibleStateError(_shape_mismatch(state_dir, found, expected))
    return found


def read_layout(state_dir: Path) -> Layout:
    """The layout recorded in ``state_dir``; a missing or unreadable record is an error."""
    path = state_dir / LAYOUT_FILE
    try:
        doc = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise StateNotFoundError(
            f"no session state in {state_dir}: {LAYOUT_FILE} is missing. Check --state-dir "
            "(it defaults to STREAMREC_STATE_DIR); the flow creates it on its first run."
        ) from None
    except orjson.JSONDecodeError as err:
        raise IncompatibleStateError(
            f"{path} is not valid JSON ({err}): restore it from a backup, or start from an "
            f"empty --state-dir {_REBUILT}."
        ) from None
    try:
        layout = Layout(int(doc["format_version"]), int(doc["shard_count"]))
    except (KeyError, TypeError, ValueError) as err:
        raise IncompatibleStateError(
            f"{path} lacks or mistypes format_version or shard_count ({err!r}): restore it "
            f"from a backup, or start from an empty --state-dir {_REBUILT}."
        ) from None
    if layout.format_version != STATE_FORMAT_VERSION:
        raise IncompatibleStateError(
            f"state directory {state_dir} is in state format {layout.format_version}; this "
            f"build reads format {STATE_FORMAT_VERSION}. Run the streamrec version that wrote "
            "it, migrate it, or start from an empty --state-dir."
        )
    return layout


def check_topic_incarnation(state_dir: Path, topic: str, topic_id: str) -> None:
    """Refuse state built from another incarnation of the events topic; record it if new.

    Offsets restart at 0 in a topic that was deleted and recreated under the same
    name, so the stamps of the old one would pass new events off as replays.
    """
    path = state_dir / LAYOUT_FILE
    doc = orjson.loads(path.read_bytes())
    found = doc.get("events_topic_id")
    if found is None:
        doc["events_topic"], doc["events_topic_id"] = topic, topic_id
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        temporary.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        os.replace(temporary, path)
    elif found != topic_id:
        raise TopicIncarnationError(
            f"the session state in {state_dir} was built from another incarnation of topic "
            f"{doc.get('events_topic', topic)!r} (topic id {found}; the topic now has id "
            f"{topic_id}: it was deleted and recreated). Its offset stamps do not apply to "
            "the new topic, so new events would pass for replays. Start afresh with "
            f"`streamrec state reset --state-dir {state_dir}` (it also clears the recovery "
            "store), or point --state-dir at state made from the current topic."
        )


def shard_record(shard_index: int, shard_count: int) -> bytes:
    """What a shard DB stores about itself (under ``keys.SHAPE_KEY``)."""
    return orjson.dumps(
        {
            "format_version": STATE_FORMAT_VERSION,
            "shard_index": shard_index,
            "shard_count": shard_count,
        }
    )


def check_shard_record(db_path: Path, record: bytes, shard_index: int, shard_count: int) -> None:
    """Refuse a shard DB whose own record names another format, shard index or shard count."""
    try:
        doc = orjson.loads(record)
        found = (int(doc["format_version"]), int(doc["shard_index"]), int(doc["shard_count"]))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise IncompatibleStateError(
            f"shard DB {db_path} has an unreadable shape record ({err!r}): restore the DB "
            f"from a backup, or start from an empty --state-dir {_REBUILT}."
        ) from None
    expected = (STATE_FORMAT_VERSION, shard_index, shard_count)
    if found != expected:
        raise IncompatibleStateError(
            f"shard DB {db_path} was made as shard {found[1]} of {found[2]} (state format "
            f"{found[0]}); it is being opened as shard {shard_index} of {shard_count} (state "
            f"format {STATE_FORMAT_VERSION}). Shard i holds the users of partition i of the "
            "events topic, so a DB renamed, moved from another state directory or made for "
            f"another partition count holds the wrong users: put it back as shard-{found[1]} "
            f"of a state directory for {_many(found[2], 'partition')}, or start from an empty "
            f"--state-dir {_REBUILT}."
        )


def _shape_mismatch(state_dir: Path, found: Layout, expected: Layout) -> str:
    return (
        f"state directory {state_dir} was laid out for {_many(found.shard_count, 'shard')} "
        "(one per partition of the events topic); the events topic now has "
        f"{_many(expected.shard_count, 'partition')}. {_WHY_REFUSED}: recreate the topic "
        f"with {_many(found.shard_count, 'partition')}, or start from an empty --state-dir "
        f"{_REBUILT}."
    )


def _many(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _layout_doc(layout: Layout) -> dict[str, object]:
    return {"format_version": layout.format_version, "shard_count": layout.shard_count}


def _create_exclusively(path: Path, content: bytes) -> None:
    """Write ``path`` whole, unless it exists: workers opening shards may race to create it."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with temporary.open("wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        # link() fails if the target exists, so readers never see a half-written file.
        os.link(temporary, path)
    except FileExistsError:
        pass
    finally:
        temporary.unlink(missing_ok=True)
