"""The served models: A/B splits by user, and new artifacts taken by a running flow."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner
from prometheus_client import REGISTRY

from streamrec.cli import cli
from streamrec.contracts import Event
from streamrec.flows import models as models_module
from streamrec.flows.cli import EXIT_CONFIGURATION
from streamrec.flows.models import (
    Fingerprint,
    ModelSet,
    ModelWatcher,
    VariantSpecError,
    load_model_set,
    parse_variants,
)
from streamrec.model.manifest import seal
from streamrec.model.serving import read_card
from streamrec.settings import Settings
from tests.flow_harness import FlowProcess, RecommendationCollector, produce

ARTIFACTS = Settings().model_dir
SERVED = read_card(ARTIFACTS)["chosen"]  # the int8 student the card chose
SPLIT = f"{SERVED}=90,teacher=10"


def artifacts_copy(
    where: Path,
    name: str,
    chosen: str | None = None,
    broken: str | None = None,
    extra_items: int = 0,
) -> Path:
    """The trained artifacts, hard-linked (no copy of their bytes), the card's choice changed
    to ``chosen``, the file ``broken`` cut short, or ``extra_items`` the model never learned
    added to the vocabulary; sealed again after any change, as `streamrec model seal` does,
    so that what refuses them is the loader's own checks, not the manifest."""
    copy = where / name
    shutil.copytree(ARTIFACTS, copy, copy_function=os.link)
    if extra_items:
        vocab = orjson.loads((copy / "vocab.json").read_bytes())
        vocab["items"] += [f"unknown-{n}" for n in range(extra_items)]
        (copy / "vocab.json").unlink()
        (copy / "vocab.json").write_bytes(orjson.dumps(vocab))
    if chosen is not None:
        card = orjson.loads((copy / "card.json").read_bytes())
        card["chosen"] = chosen
        (copy / "card.json").unlink()  # a new file: the hard link's bytes are the original's
        (copy / "card.json").write_bytes(orjson.dumps(card))
    if broken is not None:
        data = (copy / broken).read_bytes()
        (copy / broken).unlink()
        (copy / broken).write_bytes(data[: len(data) // 3])
    if extra_items or chosen is not None or broken is not None:
        seal(copy)  # replaces manifest.json: the committed one, hard-linked, stays as it was
    return copy


def tampered_copy(where: Path, name: str, file: str) -> Path:
    """The trained artifacts with one byte of ``file`` flipped in its middle, not sealed."""
    copy = where / name
    shutil.copytree(ARTIFACTS, copy, copy_function=os.link)
    data = bytearray((copy / file).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / file).unlink()
    (copy / file).write_bytes(bytes(data))
    return copy


def watching(
    tmp_path: Path, workers: int = 1, check_s: float = 5.0
) -> tuple[Path, ModelSet, ModelWatcher]:
    """A model directory link to a copy of the artifacts, what it serves, and its watcher."""
    link = tmp_path / "current"
    link.symlink_to(artifacts_copy(tmp_path, "v1"))
    settings = Settings(model_dir=link, model_check_s=check_s)
    shares = parse_variants(None)
    serving = load_model_set(link, shares, settings)
    return link, serving, ModelWatcher(settings, shares, serving, workers=workers)


def repoint(link: Path, target: Path) -> None:
    """Switch a symlink atomically, as `ln -sfn` does: a reader sees the old or the new one."""
    staged = link.with_name(link.name + ".new")
    staged.unlink(missing_ok=True)
    staged.symlink_to(target)
    staged.replace(link)


def test_a_split_names_each_variant_with_its_weight() -> None:
    assert parse_variants(SPLIT) == [(SERVED, 90), ("teacher", 10)]
    assert parse_variants("teacher") == [("teacher", 100)]
    assert parse_variants(None) == [(None, 100)]


@pytest.mark.parametrize(
    "text",
    ["a=90,b", "a=ninety", "a=0,b=10", "a=1,a=2", "=5", "a=-1"],
)
def test_a_split_that_cannot_be_served_as_written_is_refused(text: str) -> None:
    with pytest.raises(VariantSpecError):
        parse_variants(text)


def test_each_user_keeps_one_variant_and_the_shares_follow_the_weights() -> None:
    models = load_model_set(ARTIFACTS, parse_variants(SPLIT), Settings())
    users = [f"user-{n}" for n in range(20_000)]
    picks = [models.pick(user) for user in users]
    assert picks == [models.pick(user) for user in users]  # stable
    share = Counter(picks)[1] / len(users)
    assert 0.08 < share < 0.12
    assert [v.split("@")[0] for v in models.versions] == [SERVED, "teacher"]


def test_the_watcher_takes_new_artifacts_and_refuses_broken_ones_with_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streamrec.flows.models")
    link, _, watcher = watching(tmp_path, workers=2)
    assert not watcher.check()  # nothing changed

    repoint(link, artifacts_copy(tmp_path, "v2", chosen="teacher"))
    assert watcher.check()
    generation, taken = watcher.take()
    assert generation == 1 and taken is not None
    assert taken.versions[0].startswith("teacher@")
    assert watcher.take()[1] is not None and watcher.take()[1] is None  # one per worker

    broken_ones = [
        artifacts_copy(tmp_path, "v3", chosen="teacher", broken="teacher.onnx"),
        artifacts_copy(tmp_path, "v4", chosen="teacher", broken="vocab.json"),
        artifacts_copy(tmp_path, "v5", chosen="teacher", extra_items=500),  # a wrong vocabulary
        tmp_path / "missing",
    ]
    for target in broken_ones:
        repoint(link, target)
        assert not watcher.check()
        assert not watcher.check()  # said once, not at every look
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 3, refusals  # a link to nothing is a swap under way: no model yet
    assert all("still serving teacher@" in line for line in refusals)
    assert watcher.generation == 1


def refused_on_metrics(reason: str) -> float:
    return REGISTRY.get_sample_value("streamrec_model_refused_total", {"reason": reason}) or 0.0


def test_a_version_tampered_after_sealing_is_refused_at_roll_out_and_the_old_one_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streamrec.flows.models")
    link, serving, watcher = watching(tmp_path)
    before = refused_on_metrics("digest")

    repoint(link, tampered_copy(tmp_path, "v2", f"{SERVED}.onnx"))
    assert not watcher.check()
    assert watcher.generation == 0 and watcher.take() == (0, None)
    refusals = [r.getMessage() for r in caplog.records if "refused the model" in r.getMessage()]
    assert len(refusals) == 1, refusals
    assert f"DigestMismatch: {SERVED}.onnx" in refusals[0]
    assert f"still serving {serving.versions[0]}" in refusals[0]
    assert refused_on_metrics("digest") == before + 1
    assert tuple(serving.versions[0].split("@")) in served_on_metrics()


def test_a_hand_edited_version_rolls_out_once_sealed_with_streamrec_model_seal(
    tmp_path: Path,
) -> None:
    link, _, watcher = watching(tmp_path)
    edited = tampered_copy(tmp_path, "v2", "card.json")
    card = orjson.loads((ARTIFACTS / "card.json").read_bytes())
    card["chosen"] = "teacher"
    (edited / "card.json").write_bytes(orjson.dumps(card))  # a new file since tampered_copy
    repoint(link, edited)
    assert not watcher.check()  # its card.json is not the one sealed

    sealed = CliRunner().invoke(cli, ["model", "seal", str(edited)])
    assert sealed.exit_code == 0, sealed.output
    assert watcher.check()
    (version,) = watcher.take()[1].versions  # type: ignore[union-attr]
    assert version.startswith("teacher@")


def test_a_tampered_model_stops_the_flow_at_start_with_one_line_and_exit_78(
    tmp_path: Path,
) -> None:
    # The model is checked before Kafka is asked anything: no broker needed.
    settings = Settings(
        brokers="127.0.0.1:9",
        model_dir=tampered_copy(tmp_path, "v1", f"{SERVED}.onnx"),
        state_dir=tmp_path / "state",
        recovery_dir=tmp_path / "recovery",
        metrics_port=0,
    )
    flow = FlowProcess(settings).start()
    assert flow.process is not None
    assert flow.process.wait(120) == EXIT_CONFIGURATION, flow.output()[-2000:]
    lines = [line for line in flow.output().splitlines() if "cannot go on" in line]
    assert len(lines) == 1, flow.output()
    assert f"{SERVED}.onnx" in lines[0] and "is not the file that was sealed" in lines[0]


def served_on_metrics() -> set[tuple[str, str]]:
    """The (variant, version) pairs /metrics says this process serves."""
    (family,) = [m for m in REGISTRY.collect() if m.name == "streamrec_model_serving"]
    return {(s.labels["variant"], s.labels["version"]) for s in family.samples if s.value == 1}


def test_metrics_name_the_served_version_before_and_after_a_roll_out(tmp_path: Path) -> None:
    link, serving, watcher = watching(tmp_path)
    (before,) = serving.versions
    assert tuple(before.split("@")) in served_on_metrics()

    repoint(link, artifacts_copy(tmp_path, "v2", chosen="teacher"))
    assert watcher.check()
    (after,) = watcher.take()[1].versions  # type: ignore[union-attr]
    assert tuple(after.split("@")) in served_on_metrics()
    assert tuple(before.split("@")) not in served_on_metrics()


def test_the_watcher_survives_its_own_failure_and_rolls_out_on_its_next_look(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Found by review: an unexpected error ended the watcher's thread, silently, for good.
    link, _, watcher = watching(tmp_path, check_s=0.05)
    real_fingerprint = models_module.fingerprint
    failures = [RuntimeError("the disk hiccuped")] * 3

    def fingerprint_failing_at_first(model_dir: Path) -> Fingerprint:
        if failures:
            raise failures.pop()
        return real_fingerprint(model_dir)

    monkeypatch.setattr(models_module, "fingerprint", fingerprint_failing_at_first)
    repoint(link, artifacts_copy(tmp_path, "v2", chosen="teacher"))
    watcher.start()
    try:
        deadline = time.monotonic() + 30
        while watcher.generation == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        watcher.stop()
    assert watcher.generation == 1
    said = [r.getMessage() for r in caplog.records if "model directory failed" in r.getMessage()]
    assert len(said) == 1, said  # the same failure, said once


def _produce_steadily(settings: Settings, events: list[Event], stop: threading.Event) -> None:
    for start in range(0, len(events), 20):
        if stop.is_set():
            return
        produce(settings, events[start : start + 20])
        time.sleep(0.1)


@pytest.mark.kafka
@pytest.mark.usefixtures("no_flow_left_behind")
def test_a_running_flow_switches_model_under_load_and_loses_no_event(
    kafka_settings: Settings, movielens: list[Event], tmp_path: Path
) -> None:
    link = tmp_path / "current"
    link.symlink_to(artifacts_copy(tmp_path, "v1"))
    settings = kafka_settings.replace(model_dir=link, model_check_s=0.5)
    events = movielens[:1500]
    stop = threading.Event()
    producing = threading.Thread(target=_produce_steadily, args=(settings, events, stop))
    collector = RecommendationCollector(settings)
    flow = FlowProcess(settings).start()
    try:
        producing.start()
        collector.wait_for({e.event_id for e in events[:300]}, flow)
        repoint(link, artifacts_copy(tmp_path, "v2", chosen="teacher"))
        collector.wait_for({e.event_id for e in events[:900]}, flow)
        repoint(
            link,
            artifacts_copy(tmp_path, "v3", chosen=SERVED, broken="teacher.onnx"),
        )
        repoint(link, artifacts_copy(tmp_path, "v4", broken=f"{SERVED}.onnx"))
        repoint(link, tampered_copy(tmp_path, "v5", f"{SERVED}.onnx"))
        producing.join()
        collector.wait_for({e.event_id for e in events}, flow)
        assert flow.stop() == 0, flow.output()[-2000:]
    finally:
        stop.set()
        collector.close()

    # Each event answered, in the order the flow read them (one partition at a time).
    answered = {event_id: recs[0].model for event_id, recs in collector.by_event.items()}
    assert set(answered) >= {e.event_id for e in events}
    order = [answered[e.event_id].split("@")[0] for e in events]
    assert order[0] == SERVED and order[-1] == "teacher"
    assert order.count("teacher") < len(order)  # the switch happened under load, not before
    assert f"model roll-out: {SERVED}@" in flow.output()
    assert flow.output().count("refused the model") >= 1
    assert f"DigestMismatch: {SERVED}.onnx" in flow.output()  # v5, the last one, stays


@pytest.mark.kafka
@pytest.mark.usefixtures("no_flow_left_behind")
def test_an_ab_split_answers_each_user_always_with_their_variant(
    kafka_settings: Settings, movielens: list[Event]
) -> None:
    events = movielens[:800]
    produce(kafka_settings, events)
    flow = FlowProcess(kafka_settings, ["--variant", f"{SERVED}=50,teacher=50"]).start()
    collector = RecommendationCollector(kafka_settings)
    try:
        collector.wait_for({e.event_id for e in events}, flow)
        assert flow.stop() == 0, flow.output()[-2000:]
    finally:
        collector.close()
    variants_of: dict[str, set[str]] = {}
    for recs in collector.by_event.values():
        variants_of.setdefault(recs[0].user_id, set()).add(recs[0].model.split("@")[0])
    assert all(len(variants) == 1 for variants in variants_of.values())
    assert set().union(*variants_of.values()) == {SERVED, "teacher"}
