"""The ways session state can fail, each with its own type and a message that says what to do."""

from __future__ import annotations


class StateError(Exception):
    """Base of every failure of the session state store."""


class IncompatibleStateError(StateError):
    """The state directory was made by another format version or for another partition count."""


class StateLockedError(StateError):
    """A shard's RocksDB is already open elsewhere: one owner per DB, never two."""


class StateNotFoundError(StateError):
    """There is no session state where it was looked for."""


class StateWriteError(StateError):
    """RocksDB refused a write (a full disk, an I/O error): nothing of the batch was written."""


class TopicIncarnationError(IncompatibleStateError):
    """The state was built from an events topic that has since been deleted and recreated."""


class CorruptSessionError(StateError):
    """A stored session record cannot be decoded; ``user_key`` names the record."""

    def __init__(self, user_key: str | bytes, reason: str) -> None:
        self.user_key = _readable(user_key)
        self.reason = reason
        super().__init__(
            f"session record of user {self.user_key!r} is corrupt: {reason}. "
            "The flow moves such a record aside (key q:<user id>) and starts the user afresh."
        )


class UnknownSessionFormatError(StateError):
    """A stored session record has a format version this build cannot read."""

    def __init__(self, user_key: str | bytes, found: int, supported: int) -> None:
        self.user_key = _readable(user_key)
        self.found = found
        self.supported = supported
        super().__init__(
            f"session record of user {self.user_key!r} has format version {found}; this build "
            f"reads version {supported}. Run the streamrec version that wrote it, or migrate the "
            "store."
        )


def _readable(user_key: str | bytes) -> str:
    # Scans meet keys as bytes; a key that is not UTF-8 still shows, escaped.
    if isinstance(user_key, bytes):
        return user_key.decode("utf-8", errors="backslashreplace")
    return user_key
