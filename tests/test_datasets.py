"""Datasets become time-ordered event streams, one loader per format."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamrec.contracts import Event
from streamrec.datasets import (
    SYNTHETIC_EPOCH_MS,
    SYNTHETIC_STEP_MS,
    DatasetError,
    detect_format,
    load_events,
)
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


VIDEO_GAMES = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon-video-games"


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def test_user_item_lines_keep_each_users_order(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.txt", ["7 3", "7 1", "7 2", "5 9", "5 8"])
    events = load_events(path)
    per_user: dict[str, list[str]] = {}
    for e in events:
        per_user.setdefault(e.user_id, []).append(e.item_id)
    assert per_user == {"7": ["3", "1", "2"], "5": ["9", "8"]}


def test_user_item_lines_interleave_users_on_one_timeline(tmp_path: Path) -> None:
    # Each user's k-th of n interactions sits at (k + 1/2) / n of the timeline.
    path = write_lines(tmp_path / "d.txt", ["a 1", "a 2", "b 3", "b 4", "b 5", "b 6"])
    events = load_events(path)
    assert [(e.user_id, e.item_id) for e in events] == [
        ("b", "3"),
        ("a", "1"),
        ("b", "4"),
        ("b", "5"),
        ("a", "2"),
        ("b", "6"),
    ]


def test_user_item_lines_get_one_distinct_step_each_from_a_fixed_epoch(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.txt", ["1 1", "1 2", "2 1", "3 4"])
    first, second = load_events(path), load_events(path)
    assert first == second
    assert [e.ts for e in first] == [
        SYNTHETIC_EPOCH_MS + i * SYNTHETIC_STEP_MS for i in range(len(first))
    ]
    assert {e.type for e in first} == {"purchase"}
    assert len({e.event_id for e in first}) == len(first)


def test_a_folder_with_one_data_txt_is_read_as_user_item_lines(tmp_path: Path) -> None:
    write_lines(tmp_path / "set" / "interactions.txt", ["1 2", "1 3"])
    write_lines(tmp_path / "set" / "README.txt", ["not data"])
    (tmp_path / "set" / "SOURCE.md").write_text("about")
    assert detect_format(tmp_path / "set") == "user-item-lines"
    assert [e.item_id for e in load_events(tmp_path / "set")] == ["2", "3"]


def test_a_folder_with_two_data_txts_names_them(tmp_path: Path) -> None:
    write_lines(tmp_path / "set" / "a.txt", ["1 2"])
    write_lines(tmp_path / "set" / "b.txt", ["1 3"])
    with pytest.raises(DatasetError, match=r"a\.txt.*b\.txt"):
        load_events(tmp_path / "set")


def test_a_user_whose_lines_are_split_is_refused_with_the_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.txt", ["1 2", "2 3", "1 4"])
    with pytest.raises(DatasetError, match=r"d\.txt:3: user 1"):
        load_events(path)


def test_a_line_without_two_fields_names_its_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.txt", ["1 2", "1 2 3"])
    with pytest.raises(DatasetError, match=r"d\.txt:2: expected 'user item'"):
        load_events(path)


@pytest.mark.skipif(not VIDEO_GAMES.exists(), reason="the shared video-games data is not here")
def test_the_shared_video_games_dataset_loads_whole() -> None:
    events = load_events(VIDEO_GAMES)
    assert len(events) == 287_107
    assert len({e.user_id for e in events}) == 31_013
    assert len({e.item_id for e in events}) == 23_715
    assert all(a.ts < b.ts for a, b in zip(events, events[1:], strict=False))
    # The final tenth of time holds many users' latest interactions, not a few users' all.
    tail = events[int(len(events) * 0.9) :]
    assert len({e.user_id for e in tail}) > 10_000
