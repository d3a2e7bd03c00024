"""librdkafka's log for the flow's clients: on stderr as before, each distinct line once a minute.

While a broker is away, librdkafka says each failure every time it retries: a few
lines a second from every client.  One line per minute says the same.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Final

# Each distinct line (numbers aside) is shown once in this many seconds.
LOG_REPEAT_S: Final = 60.0


class _RepeatFilter(logging.Filter):
    """Passes each distinct log line once per ``LOG_REPEAT_S``; numbers in it do not count."""

    _NUMBERS = re.compile(r"\d+")

    def __init__(self) -> None:
        super().__init__()
        self._shown: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        line = self._NUMBERS.sub("#", record.getMessage())
        now = time.monotonic()
        shown = self._shown.get(line)
        if shown is not None and now - shown < LOG_REPEAT_S:
            return False
        if len(self._shown) >= 1024:
            self._shown.clear()
        self._shown[line] = now
        return True


def kafka_logger(client: str) -> logging.Logger:
    """The logger to pass a librdkafka client as ``logger`` (``client``: producer, consumer)."""
    logger = logging.getLogger(f"streamrec.flow.{client}")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("kafka %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.addFilter(_RepeatFilter())
        # librdkafka's own log_level decides what is said; this logger passes it all.
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
    return logger
