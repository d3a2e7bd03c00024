"""Interaction datasets turned into time-ordered streams of ``Event``s, one loader per format.

Training (``model/``) and traffic replay (``tools/``) both read data through
``load_events``, so a new dataset needs one new loader here and nothing else.
Ties in time are common (ratings arrive in bursts); the order is made stable by
sorting on (event time, position in the source), so every run sees one order.

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
}


def detect_format(path: Path) -> str:
    if path.is_dir() and (path / "ratings.csv").exists():
        return "movielens"
    if path.name == "ratings.csv":
        return "movielens"
    if path.suffix in {".jsonl", ".ndjson"}:
        return "events-jsonl"
    raise DatasetError(
        f"cannot tell the format of {path}: expected a MovieLens directory with ratings.csv "
        f"or a .jsonl file of events; pass the format explicitly ({', '.join(LOADERS)})"
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
