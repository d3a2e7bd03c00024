"""The per-user session a peer keeps: the last items and the offset of the last event applied.

A plain dict, so that each framework can store it as it stores any value
(Bytewax pickles it into its snapshots, Quix Streams serializes it to JSON
in RocksDB and its changelog).

>>> s = apply_event(None, "i1", offset=7, length=2)
>>> s = apply_event(s, "i2", offset=8, length=2)
>>> s = apply_event(s, "i3", offset=9, length=2)
>>> s
{'items': ['i2', 'i3'], 'offset': 9}
>>> is_replay(s, 8), is_replay(s, 9), is_replay(s, 10)
(True, True, False)
"""

from __future__ import annotations

from typing import TypedDict


class Session(TypedDict):
    items: list[str]
    offset: int


def is_replay(session: Session | None, offset: int) -> bool:
    """An event at or below the session's offset was applied already (read again)."""
    return session is not None and offset <= session["offset"]


def apply_event(session: Session | None, item_id: str, offset: int, length: int) -> Session:
    """``item_id`` appended, cut to the last ``length`` items, stamped ``offset``."""
    items = [*(session["items"] if session else []), item_id][-length:]
    return {"items": items, "offset": offset}
