"""`bench stages` measures every hot-path stage on the committed model, without Kafka."""

from __future__ import annotations

from streamrec.bench.stages import measure_stages
from streamrec.datasets import load_events
from streamrec.settings import Settings


def test_every_stage_gets_a_positive_cost_per_event() -> None:
    settings = Settings()
    figures = measure_stages(load_events(settings.data_dir)[:64], 8, settings, None)
    assert set(figures) == {"parse_us", "state_us", "recommend_us"}
    assert all(value > 0 for value in figures.values())
