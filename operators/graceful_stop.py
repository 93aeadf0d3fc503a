"""Stop on SIGTERM/SIGINT the resumable way: end the input, let the flow drain.

Sources call :func:`stop_requested` before each poll and end their partition
when it is set. The flow then reaches EOF normally: operators finish, sinks
flush, Bytewax commits a last snapshot, and the process exits 0. A second
signal falls back to the default action (an immediate stop; a resume replays
from the last snapshot, which the idempotent sinks absorb).

    >>> stop_requested()
    False
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)

_stop = threading.Event()


def stop_requested() -> bool:
    return _stop.is_set()


def request_stop(reason: str = "requested") -> None:
    if not _stop.is_set():
        log.info("graceful stop: ending input, flushing outputs", extra={"reason": reason})
    _stop.set()


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    if _stop.is_set():
        log.warning("second stop signal: stopping now", extra={"signal": name})
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
        return
    request_stop(name)


def install_signal_handlers() -> bool:
    """Handle SIGTERM and SIGINT gracefully; only possible from the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _on_signal)
    return True
