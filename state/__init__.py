"""What the flow knows about each user: sessions in RocksDB, one DB per shard.

Shard i holds the users of partition i of the events topic (see ``layout``).

Read in this order: ``session`` (the record and its encoding), ``store`` (apply
exactly once: the hot path), then what the store leaves to others: ``expiry``
(the clock, sweeps), ``consumed`` (the items consumed beyond the window) and
``erasure`` (forgetting a user, quarantine); ``layout`` and ``keys`` (where
things live on disk), ``rocks`` (RocksDB options and scans), ``view`` (read-only
access for the command line), ``errors``; ``cli`` and ``bench`` are the front
door.
"""

from streamrec.state.errors import (
    CorruptSessionError,
    IncompatibleStateError,
    StateError,
    StateLockedError,
    StateNotFoundError,
    UnknownSessionFormatError,
)
from streamrec.state.session import Session
from streamrec.state.store import ApplyResult, SessionStore, StoreCounters
from streamrec.state.view import StateView, open_state_view

__all__ = [
    "ApplyResult",
    "CorruptSessionError",
    "IncompatibleStateError",
    "Session",
    "SessionStore",
    "StateError",
    "StateLockedError",
    "StateNotFoundError",
    "StateView",
    "StoreCounters",
    "UnknownSessionFormatError",
    "open_state_view",
]
