"""Graceful stop on SIGTERM/SIGINT, kept free of heavy imports.

The handler is installed before the flow loads its model and opens its
stores (seconds of work), so a stop that arrives during start-up is a clean
exit too, not the default SIGTERM death.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

# Set on the first SIGTERM/SIGINT: every reader ends its partition, so the
# dataflow completes as on finite input: batches in flight are finished,
# sinks closed.
STOP_READING = threading.Event()

# The flow's first line, written once the handler is in place: from then on a
# SIGTERM is a clean stop (before it, the interpreter is still starting).
STARTING = "flow: starting (SIGTERM or Ctrl-C stops it cleanly)"


def stop_gracefully_on_signals() -> None:
    """First SIGTERM/SIGINT: stop reading and let the flow drain; a second one aborts."""

    def stop(signum: int, frame: FrameType | None) -> None:
        if STOP_READING.is_set():
            raise KeyboardInterrupt
        print(f"flow: {signal.Signals(signum).name}: finishing work in flight", file=sys.stderr)
        STOP_READING.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
