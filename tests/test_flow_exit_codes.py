"""What each way of stopping tells a supervisor, and the README's systemd unit agrees.

69 may pass by itself (retry later), 74 is the disk, 65 and 78 need a person
(the unit does not restart them). The flows that stop for real with these codes
are in test_flow_robustness.py and test_kafka_security.py; here every kind of
failure is mapped, wrapped the way Bytewax wraps a step's exception.
"""

from __future__ import annotations

import errno
import re
import socket
from collections.abc import Iterator

import pytest
from bytewax.errors import BytewaxRuntimeError
from confluent_kafka import KafkaError

from streamrec.flows.cli import (
    EXIT_CONFIGURATION,
    EXIT_STATE_UNUSABLE,
    EXIT_STATE_UNWRITABLE,
    EXIT_UNAVAILABLE,
    exit_code_of,
)
from streamrec.flows.guarantee.transactions import ProducerFenced
from streamrec.flows.metrics import MetricsEndpointError, serve
from streamrec.flows.source import ResumeOffsetError
from streamrec.kafka_clients import KafkaRefused, KafkaUnavailable
from streamrec.settings import REPO_ROOT
from streamrec.state import changelog
from streamrec.state.changelog import ChangelogError
from streamrec.state.errors import StateWriteError


def as_bytewax_raises(cause: BaseException) -> BytewaxRuntimeError:
    """``cause`` raised in a step, as Bytewax re-raises it: wrapped, the cause chained."""
    try:
        try:
            raise cause
        except BaseException as err:
            raise BytewaxRuntimeError("error calling `StatefulBatchLogic.on_batch`") from err
    except BytewaxRuntimeError as wrapped:
        return wrapped


@pytest.mark.parametrize(
    ("cause", "code"),
    [
        (KafkaUnavailable("cannot reach Kafka"), EXIT_UNAVAILABLE),
        (KafkaRefused("not allowed to use transactional id"), EXIT_CONFIGURATION),
        (StateWriteError("No space left on device"), EXIT_STATE_UNWRITABLE),
        (ChangelogError("written for another incarnation"), EXIT_STATE_UNUSABLE),
        (ProducerFenced("served by another process now"), EXIT_STATE_UNUSABLE),
        (ResumeOffsetError("behind the changelog"), EXIT_STATE_UNUSABLE),
    ],
)
def test_each_kind_of_failure_stops_with_its_own_code_and_its_line(
    cause: Exception, code: int
) -> None:
    assert exit_code_of(as_bytewax_raises(cause)) == (code, str(cause))


def test_a_bug_is_exit_1_with_its_traceback() -> None:
    assert exit_code_of(as_bytewax_raises(ValueError("a bug"))) == (1, None)


def systemd_unit_prevents_restart() -> set[int]:
    readme = (REPO_ROOT / "README.md").read_text()
    found = re.search(r"^RestartPreventExitStatus=([\d ]+)$", readme, re.MULTILINE)
    assert found, "the README's systemd unit has no RestartPreventExitStatus line"
    return {int(code) for code in found.group(1).split()}


def test_the_readmes_systemd_unit_restarts_what_may_pass_and_holds_what_needs_a_person() -> None:
    held = systemd_unit_prevents_restart()
    assert {2, EXIT_STATE_UNUSABLE, EXIT_CONFIGURATION} <= held
    assert not held & {1, EXIT_UNAVAILABLE, EXIT_STATE_UNWRITABLE}


class SilentConsumer:
    """A changelog consumer whose broker stalled: assigned, it never delivers a record."""

    def assign(self, _partitions: object) -> None:
        pass

    def consume(self, _count: int, timeout: float) -> list[object]:
        return []


def test_a_rebuild_the_broker_stalls_is_retryable_not_a_state_for_a_person(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(changelog, "READ_TIMEOUT_S", 0.0)
    records = changelog._read(SilentConsumer(), "events.sessions-changelog", 0, 0, 100)  # type: ignore[arg-type]
    with pytest.raises(KafkaUnavailable, match="no record arrived") as stalled:
        next(records)
    assert not isinstance(stalled.value, KafkaRefused)
    assert exit_code_of(as_bytewax_raises(stalled.value))[0] == EXIT_UNAVAILABLE


@pytest.mark.parametrize(
    ("code", "kind", "exit_code"),
    [
        (KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaRefused, EXIT_CONFIGURATION),
        (KafkaError._TRANSPORT, KafkaUnavailable, EXIT_UNAVAILABLE),
        (KafkaError._BAD_MSG, ChangelogError, EXIT_STATE_UNUSABLE),
    ],
)
def test_a_changelog_read_error_is_told_apart_by_what_can_fix_it(
    code: int, kind: type[Exception], exit_code: int
) -> None:
    failure = changelog._read_failure("events.sessions-changelog", KafkaError(code))
    assert type(failure) is kind
    assert exit_code_of(as_bytewax_raises(failure))[0] == exit_code


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_a_metrics_port_in_use_is_retryable(taken_port: int) -> None:
    with pytest.raises(MetricsEndpointError, match="is taken") as taken:
        serve("127.0.0.1", taken_port)
    assert taken.value.retryable


def test_a_metrics_address_this_machine_does_not_have_is_configuration() -> None:
    # 192.0.2.0/24 is reserved for documentation: no machine has it.
    with pytest.raises(MetricsEndpointError, match="cannot be listened on") as refused:
        serve("192.0.2.7", 0)
    assert not refused.value.retryable
    assert refused.value.__cause__ is not None
    assert getattr(refused.value.__cause__, "errno", None) == errno.EADDRNOTAVAIL


def test_the_metrics_endpoint_listens_on_the_address_it_is_given() -> None:
    server = serve("127.0.0.1", 0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.shutdown()
