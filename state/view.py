"""A read-only look at all the shard DBs of a state directory, for the command line.

It can be opened while a flow runs: RocksDB lets a read-only reader in beside
the writer, and the reader sees the state as it was when it opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from rocksdict import Rdict

from state.keys import session_key
from state.layout import Layout, existing_shards, read_layout, shard_dir
from state.rocks import ShardStats, open_read_only, read_clock, scan_stats
from state.session import Session, decode_session
from streamrec.settings import Settings


@dataclass(frozen=True, slots=True)
class FoundSession:
    """A session found in a shard DB, and whether it has expired by the view's clock."""

    shard_index: int
    session: Session
    expired: bool


class StateView:
    """Every shard DB of one state directory, opened read-only.

    Responsibilities: find a user's session in whichever shard DB holds it (the
    producer's partitioner decides the shard, so each DB gets one point read), and
    report per-shard sizes.  Expiry is judged against the latest event time any
    shard has applied, unless the caller names another "now".  Open it with
    ``open_state_view``.
    """

    def __init__(self, state_dir: Path, layout: Layout, dbs: dict[int, Rdict], ttl_ms: int):
        self.state_dir = state_dir
        self.layout = layout
        self.ttl_ms = ttl_ms
        self._dbs = dbs
        clocks = [c for c in (read_clock(db) for db in dbs.values()) if c is not None]
        self.clock_ms: int | None = max(clocks) if clocks else None

    def find(self, user_id: str, now_ms: int | None = None) -> FoundSession | None:
        """``user_id``'s session wherever it is stored (expired or not), or None."""
        key = session_key(user_id)
        now = self.clock_ms if now_ms is None else now_ms
        for index, db in self._dbs.items():
            raw = db.get(key)
            if raw is not None:
                session = decode_session(user_id, raw)
                expired = now is not None and session.is_expired(now, self.ttl_ms)
                return FoundSession(index, session, expired)
        return None

    def stats(self) -> list[ShardStats]:
        """Sessions and bytes of every shard DB present (full scans)."""
        return [
            scan_stats(db, shard_dir(self.state_dir, index), index, self.clock_ms, self.ttl_ms)
            for index, db in self._dbs.items()
        ]

    @property
    def shards(self) -> list[int]:
        """The shards whose DB is open in this view."""
        return list(self._dbs)

    @property
    def missing_shards(self) -> list[int]:
        """Shards of the layout without a DB yet (no event of their partition processed)."""
        return [i for i in range(self.layout.shard_count) if i not in self._dbs]

    def close(self) -> None:
        """Close every DB."""
        for db in self._dbs.values():
            db.close()
        self._dbs = {}

    def __enter__(self) -> StateView:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def open_state_view(state_dir: Path, settings: Settings) -> StateView:
    """Open every shard DB of ``state_dir`` read-only; its layout must be readable."""
    layout = read_layout(state_dir)
    present = [i for i in existing_shards(state_dir) if i < layout.shard_count]
    dbs: dict[int, Rdict] = {}
    try:
        for index in present:
            dbs[index] = open_read_only(shard_dir(state_dir, index))
    except BaseException:
        for db in dbs.values():
            db.close()
        raise
    return StateView(state_dir, layout, dbs, round(settings.session_ttl_s * 1000))
