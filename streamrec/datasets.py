"""Interaction datasets turned into time-ordered streams of ``Event``s, one loader per format.

Training (``model/``) and traffic replay (``tools/``) both read data through
``load_events``, so a new dataset needs one new loader here and nothing else.
Ties in time are common (ratings arrive in bursts); the order is made stable by
sorting on (event time, position in the source), so every run sees one order.
A format without timestamps gets synthetic ones (see ``user_item_lines``).

>>> from streamrec.settings import Settings
>>> events = load_events(Settings().data_dir)
>>> len(events), events[0].type, all(a.ts <= b.ts for a, b in zip(events, events[1:]))
(100836, 'rating', True)
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson

from streamrec.contracts import ContractError, Event, parse_event

Loader = Callable[[Path], Iterator[Event]]


class DatasetError(ValueError):
    """The dataset is missing, of an unknown format, or has a malformed row."""


def movielens_ratings(path: Path) -> Iterator[Event]:
    """MovieLens ``ratings.csv`` (userId,movieId,rating,timestamp in s): each rating an event."""
    csv_path = path / "ratings.csv" if path.is_dir() else path
    with csv_path.open(newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header is None or [h.strip() for h in header[:4]] != [
            "userId",
            "movieId",
            "rating",
            "timestamp",
        ]:
            raise DatasetError(
                f"{csv_path}: expected the header userId,movieId,rating,timestamp, got {header}"
            )
        for line, row in enumerate(rows, start=2):
            try:
                user, movie, rating, seconds = row[0], row[1], float(row[2]), int(row[3])
            except (IndexError, ValueError) as err:
                raise DatasetError(f"{csv_path}:{line}: malformed row {row!r}: {err}") from None
            yield Event(
                event_id=f"ml:{user}:{movie}:{seconds}",
                user_id=user,
                item_id=movie,
                type="rating",
                ts=seconds * 1000,
                value=rating,
            )


# Synthetic clock of formats without timestamps: one second per interaction from this epoch.
SYNTHETIC_EPOCH_MS = 1_388_534_400_000  # 2014-01-01T00:00:00Z
SYNTHETIC_STEP_MS = 1000


def user_item_lines(path: Path) -> Iterator[Event]:
    """``user item`` per line, each user's lines consecutive and oldest first, no timestamps.

    The format of SASRec's preprocessed datasets (e.g. Amazon Video Games).  Times are
    synthetic: a user's k-th of n interactions sits at the fraction (k + 1/2) / n of a
    shared timeline, and all interactions, ordered by that fraction (then by line), get
    one ``SYNTHETIC_STEP_MS`` step each from ``SYNTHETIC_EPOCH_MS``.  So each user's order
    is kept, every time is distinct, every user is active across the whole timeline (the
    final stretch of time holds every user's latest interactions, not the last users in
    the file), and a replay interleaves users as a live stream would.  A review implies a
    purchase: each line is a ``purchase`` event with no value.

    >>> import tempfile
    >>> f = Path(tempfile.mkdtemp()) / "tiny.txt"
    >>> _ = f.write_text("1 10\\n1 11\\n2 12\\n")
    >>> [(e.user_id, e.item_id, e.ts - SYNTHETIC_EPOCH_MS) for e in load_events(f)]
    [('1', '10', 0), ('2', '12', 1000), ('1', '11', 2000)]
    """
    txt_path = _single_txt(path) if path.is_dir() else path
    rows: list[tuple[str, str]] = []
    length: dict[str, int] = {}
    previous = ""
    with txt_path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise DatasetError(
                    f"{txt_path}:{line_no}: expected 'user item', got {line.rstrip()!r}"
                )
            user, item = fields
            if user != previous and user in length:
                raise DatasetError(
                    f"{txt_path}:{line_no}: user {user}'s lines are not consecutive; "
                    "this format needs each user's interactions together, oldest first"
                )
            previous = user
            length[user] = length.get(user, 0) + 1
            rows.append((user, item))
    position: dict[str, int] = {}
    keyed = []
    for row_no, (user, item) in enumerate(rows):
        k = position[user] = position.get(user, -1) + 1
        keyed.append(((2 * k + 1) / (2 * length[user]), row_no, user, item, k))
    keyed.sort()
    stem = txt_path.stem
    for step, (_, _, user, item, k) in enumerate(keyed):
        yield Event(
            event_id=f"{stem}:{user}:{k}",
            user_id=user,
            item_id=item,
            type="purchase",
            ts=SYNTHETIC_EPOCH_MS + step * SYNTHETIC_STEP_MS,
        )


def _single_txt(folder: Path) -> Path:
    """The one data ``.txt`` of a dataset folder (a README.txt or LICENSE.txt is not data)."""
    found = _data_txts(folder)
    if len(found) != 1:
        raise DatasetError(
            f"{folder}: expected exactly one 'user item' .txt file, found {[p.name for p in found]}"
        )
    return found[0]


def _data_txts(folder: Path) -> list[Path]:
    return [
        p
        for p in sorted(folder.glob("*.txt"))
        if not p.name.upper().startswith(("README", "LICENSE"))
    ]


def events_jsonl(path: Path) -> Iterator[Event]:
    """One event JSON per line, in the events-topic contract (e.g. an export of the topic)."""
    with path.open("rb") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                user_id = orjson.loads(line).get("user_id", "")
                yield parse_event(line.rstrip(b"\n"), str(user_id).encode(), max_bytes=1 << 20)
            except (ContractError, orjson.JSONDecodeError, AttributeError) as err:
                raise DatasetError(f"{path}:{line_no}: {err}") from None


LOADERS: dict[str, Loader] = {
    "movielens": movielens_ratings,
    "events-jsonl": events_jsonl,
    "user-item-lines": user_item_lines,
}


def detect_format(path: Path) -> str:
    if path.is_dir() and (path / "ratings.csv").exists():
        return "movielens"
    if path.name == "ratings.csv":
        return "movielens"
    if path.suffix in {".jsonl", ".ndjson"}:
        return "events-jsonl"
    if path.suffix == ".txt":
        return "user-item-lines"
    if path.is_dir() and _data_txts(path):
        _single_txt(path)  # several candidates: say which were found
        return "user-item-lines"
    raise DatasetError(
        f"cannot tell the format of {path}: expected a MovieLens directory with ratings.csv, "
        "a .jsonl file of events, or a 'user item' .txt file (or a directory holding one); "
        f"pass the format explicitly ({', '.join(LOADERS)})"
    )


def load_events(path: Path, fmt: str = "auto") -> list[Event]:
    """All events of a dataset, ordered by event time with a stable tie-break."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset not found: {path}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in LOADERS:
        raise DatasetError(f"unknown dataset format {fmt!r} (known: {', '.join(LOADERS)})")
    events = list(LOADERS[fmt](path))
    events.sort(key=lambda e: e.ts)  # list.sort is stable: source order breaks ties
    return events
