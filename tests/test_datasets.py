"""Datasets become time-ordered event streams, one loader per format."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamrec.contracts import Event
from streamrec.datasets import DatasetError, load_events
from streamrec.settings import Settings


def write_ratings(folder: Path, rows: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "\n".join(rows))
    return folder


def test_movielens_ratings_become_rating_events_in_time_order(tmp_path: Path) -> None:
    folder = write_ratings(tmp_path / "ml", ["1,10,4.0,200", "2,20,3.5,100"])
    events = load_events(folder)
    assert events == [
        Event("ml:2:20:100", "2", "20", "rating", 100_000, 3.5),
        Event("ml:1:10:200", "1", "10", "rating", 200_000, 4.0),
    ]


def test_ties_in_time_keep_the_source_order(tmp_path: Path) -> None:
    folder = write_ratings(tmp_path / "ml", ["3,1,1,100", "1,2,1,100", "2,3,1,100"])
    assert [e.user_id for e in load_events(folder)] == ["3", "1", "2"]


def test_a_malformed_row_names_its_line(tmp_path: Path) -> None:
    folder = write_ratings(tmp_path / "ml", ["1,10,4.0,200", "1,11,oops,201"])
    with pytest.raises(DatasetError, match=r"ratings.csv:3"):
        load_events(folder)


def test_an_unknown_format_is_refused_with_the_known_ones(tmp_path: Path) -> None:
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(DatasetError, match="movielens"):
        load_events(tmp_path / "x.parquet")


def test_events_jsonl_loads_the_topic_contract(tmp_path: Path) -> None:
    event = Event("e1", "u1", "i1", "view", 1_700_000_000_000)
    path = tmp_path / "events.jsonl"
    path.write_bytes(event.to_json() + b"\n")
    assert load_events(path) == [event]


def test_the_shipped_movielens_dataset_loads_whole() -> None:
    data = Settings().data_dir
    assert (data / "README.txt").exists(), "the license requires README.txt beside the data"
    events = load_events(data)
    assert len(events) == 100_836
    assert len({e.user_id for e in events}) == 610
    assert all(a.ts <= b.ts for a, b in zip(events, events[1:], strict=False))
