"""The delivery guarantees, behind one seam (``flows/guarantee/base.py``).

``for_settings`` makes the one a deployment chose; the dataflow's source,
processor and shard map call it without knowing which it is.
"""

from __future__ import annotations

from streamrec.flows.guarantee.at_least_once import AtLeastOnce
from streamrec.flows.guarantee.base import Guarantee, PartitionProgress
from streamrec.flows.guarantee.exactly_once import ExactlyOnce
from streamrec.settings import AT_LEAST_ONCE, EXACTLY_ONCE, Settings
from streamrec.state.changelog import ChangelogWriter

__all__ = [
    "AtLeastOnce",
    "ExactlyOnce",
    "Guarantee",
    "GuaranteeChoiceError",
    "PartitionProgress",
    "check_choice",
    "for_settings",
]


class GuaranteeChoiceError(ValueError):
    """The settings ask for a guarantee that does not exist or cannot work with the others."""


def check_choice(settings: Settings) -> None:
    """Raise ``GuaranteeChoiceError`` unless ``settings`` name a guarantee that can run."""
    if settings.guarantee not in (AT_LEAST_ONCE, EXACTLY_ONCE):
        raise GuaranteeChoiceError(
            f"STREAMREC_GUARANTEE={settings.guarantee!r}: use {AT_LEAST_ONCE} or {EXACTLY_ONCE}"
        )
    if settings.guarantee == EXACTLY_ONCE and not settings.changelog:
        raise GuaranteeChoiceError(
            "--guarantee exactly-once keeps the resume offsets in the changelog: drop "
            "--no-changelog (or STREAMREC_CHANGELOG=false)"
        )


def for_settings(settings: Settings, events_topic_id: str, recovery_store: bool) -> Guarantee:
    """The guarantee ``settings`` choose, for the events topic incarnation ``events_topic_id``.

    ``recovery_store``: whether the flow has a Bytewax recovery store (at least once only).
    """
    check_choice(settings)
    if settings.guarantee == EXACTLY_ONCE:
        return ExactlyOnce(settings, events_topic_id)
    changelog = ChangelogWriter(settings, events_topic_id) if settings.changelog else None
    return AtLeastOnce(settings, changelog, events_topic_id, recovery_store)
