"""Stopping cleanly on SIGINT (Ctrl-C) and SIGTERM (``kill``, a batch scheduler's time limit).

``install()`` (the CLI calls it) turns both signals into an ``Interrupted`` exception. Loops that can
save their progress run inside ``deferred()``: there a signal is only recorded, the loop polls
``pending()`` between steps (where its state is consistent), saves, and raises ``Interrupted`` itself.
A second SIGINT while one is pending is raised at once (a user pressing Ctrl-C twice); a second
SIGTERM is the same request again and stays pending.

``Interrupted`` derives from ``BaseException`` and not from ``KeyboardInterrupt``, so neither
``except Exception`` nor the command-line framework's own Ctrl-C handling swallows it.
No printing here: the CLI renders the message from the exception's fields.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_deferring = 0
_pending: int | None = None


class Interrupted(BaseException):
    """The process got ``signum``; ``saved`` says what progress was written where (or is None)."""

    def __init__(self, signum: int, saved: str | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.saved = saved

    @property
    def exit_code(self) -> int:
        """The shell convention for death by a signal: 128 + its number (130 SIGINT, 143 SIGTERM)."""
        return 128 + int(self.signum)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


def _handler(signum, frame) -> None:
    global _pending
    if _deferring and (_pending is None or signum == signal.SIGTERM):
        # a repeated SIGTERM is the same request (a scheduler signalling every process of a job while
        # the parent `nfm sweep` passes it on too): it must not cut short the save it asked for
        if _pending is None:
            _pending = signum
        return
    raise Interrupted(signum)


def install() -> dict[int, object]:
    """Route SIGINT and SIGTERM to ``Interrupted``; returns the previous handlers for ``restore``.
    A no-op (empty dict) outside the main thread, where Python cannot set handlers."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        return {}
    _pending = None
    return {sig: signal.signal(sig, _handler) for sig in SIGNALS}


def restore(previous: dict[int, object]) -> None:
    """Put back the signal handlers ``install`` replaced."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside: a (first) signal is recorded for ``pending()`` instead of raised."""
    global _deferring, _pending
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _pending is not None:
            signum, _pending = _pending, None
            raise Interrupted(signum)


def pending() -> int | None:
    """The signal recorded inside ``deferred()`` and not yet acted on, or None."""
    return _pending


def take() -> int | None:
    """``pending()``, clearing it (the caller raises ``Interrupted`` for it)."""
    global _pending
    signum, _pending = _pending, None
    return signum
