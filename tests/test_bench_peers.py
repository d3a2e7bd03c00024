"""The peers: the same job in Quix Streams and stock Bytewax, and how the report compares them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from streamrec.bench import services
from streamrec.bench.peers.session import apply_event, is_replay
from streamrec.bench.report import evaluate_targets, side_by_side_table
from streamrec.bench.services import QUIX_VENV, ensure_quix_venv, service_commands
from streamrec.settings import Settings
from streamrec.tools.kafka_local import LocalKafka
from tests.test_bench import quick_bench


def test_a_session_keeps_the_last_items_and_the_offset_of_the_last_event_applied() -> None:
    session = None
    for offset, item in enumerate(["a", "b", "c", "d"]):
        session = apply_event(session, item, offset, length=3)

    assert session == {"items": ["b", "c", "d"], "offset": 3}
    assert is_replay(session, 3) and not is_replay(session, 4)
    assert not is_replay(None, 0)


def test_the_peers_run_from_their_frameworks_own_entry_points() -> None:
    (bytewax,) = service_commands("bytewax-stock")
    (quix,) = service_commands("quix-streams")

    assert bytewax[1:] == ["-m", "bytewax.run", "streamrec.bench.peers.bytewax_peer:flow"]
    assert quix == [str(QUIX_VENV / "bin" / "python"), "-m", "streamrec.bench.peers.quix_peer"]


def test_a_peer_in_its_own_environment_has_this_repository_installed_there(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Its folders import as streamrec.bench, streamrec.model, ... only once installed.
    ran: list[list[str]] = []
    monkeypatch.setattr(services.subprocess, "run", lambda command, **_: ran.append(command))

    (tmp_path / "venv").mkdir()  # as `python -m venv` would leave it
    ensure_quix_venv(lambda _: None, tmp_path / "venv")

    repository = str(Path(__file__).resolve().parents[1])
    assert ran[-1][-3:] == ["--no-deps", "-e", repository]


def point(variant: str, rate: float, p99: float, saturated: bool = False) -> dict[str, Any]:
    achieved = rate * (0.5 if saturated else 1.0)
    return {
        "variant": variant,
        "offered_rate": rate,
        "achieved_rate": achieved,
        "p50_ms": p99 / 4,
        "p99_ms": p99,
        "saturated": saturated,
    }


def test_the_flow_beats_the_peers_with_a_lower_p99_everywhere_and_half_again_their_rate() -> None:
    runs = [
        point("student", 1000, 12.0),
        point("student", 2000, 20.0),
        point("student", 3000, 45.0),
        point("quix-streams", 1000, 30.0),
        point("quix-streams", 2000, 900.0, saturated=True),
        point("bytewax-stock", 1000, 25.0),
        point("bytewax-stock", 2000, 48.0),
    ]

    verdicts = {t.name: (t.met, t.measured) for t in evaluate_targets(runs)}

    assert verdicts["student: p99 below quix-streams and bytewax-stock at every rate"] == (
        True,
        "lower at each of the 2 rate(s) both ran",
    )
    met, measured = verdicts["student: highest rate with p99 ≤ 50 ms ≥ 1.5× the better peer's"]
    assert met is True and measured.endswith("(1.5×)")


def test_a_rate_where_a_peer_has_the_lower_p99_is_named() -> None:
    runs = [point("student", 500, 20.0), point("quix-streams", 500, 15.0)]

    (lower,) = [t for t in evaluate_targets(runs) if "p99 below" in t.name]

    assert lower.met is False
    assert lower.measured == "not at 500 ev/s vs quix-streams"


def test_the_side_by_side_table_gives_p50_p99_saturation_and_capacity() -> None:
    runs = [
        point("student", 1000, 12.0),
        point("student", 2000, 60.0),
        point("bytewax-stock", 1000, 40.0, saturated=True),
    ]

    table = side_by_side_table(runs).splitlines()

    assert table[0] == "| offered ev/s | student p50 / p99 ms | bytewax-stock p50 / p99 ms |"
    assert table[2] == "| 1,000 | 3.00 / 12.0 | saturated at 500/s |"
    assert table[3] == "| 2,000 | 15.0 / 60.0 | not run |"
    assert table[4] == "| highest rate with p99 ≤ 50 ms | 1,000 ev/s | none |"


def _bench_one_peer(
    variant: str, kafka: LocalKafka, settings: Settings, tmp_path: Path
) -> list[dict[str, Any]]:
    json_path = tmp_path / "e2e.json"
    result = quick_bench(
        kafka,
        settings,
        variant,
        100,
        1,
        *("--warmup", "0", "--partitions", "2", "--json", str(json_path)),
        "--no-update-benchmarks",
    )
    assert result.exit_code == 0, result.output
    runs: list[dict[str, Any]] = orjson.loads(json_path.read_bytes())
    return runs


@pytest.mark.kafka
def test_stock_bytewax_answers_every_event_with_the_flows_contract(
    kafka: LocalKafka, kafka_settings: Settings, tmp_path: Path
) -> None:
    (run,) = _bench_one_peer("bytewax-stock", kafka, kafka_settings, tmp_path)

    assert run["sent"] == run["matched"] == 100 and run["duplicates"] == 0
    (model,) = run["models"]
    assert model.startswith("student")  # the project's Recommender, the card's choice


@pytest.mark.kafka
def test_quix_streams_answers_every_event_with_the_flows_contract(
    kafka: LocalKafka, kafka_settings: Settings, tmp_path: Path
) -> None:
    # The bench makes the peer's own environment from PyPI on first use (about 20 s).
    (run,) = _bench_one_peer("quix-streams", kafka, kafka_settings, tmp_path)

    assert run["sent"] == run["matched"] == 100 and run["duplicates"] == 0
    (model,) = run["models"]
    assert model.startswith("student")
