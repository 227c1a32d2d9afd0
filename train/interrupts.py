"""SIGTERM and SIGINT during `bigticket train dense`: stop at once, but never in the middle of
writing a file.

`interrupts_raise()` turns the signals into `Interrupted` raised in the main thread; inside a
`shielded()` block (writing checkpoints, the resume state, the history) the signal is held and
raised when the block ends, so whatever the run directory names on disk is complete. The run then
resumes from its last complete epoch. A second signal while stopping is ignored.

A signal that lands inside a call to the JVM (py4j: the elephas engine's Spark round) is held
too: an exception there would cut py4j's socket protocol in half and break every later call,
including the one that stops Spark. The callbacks given to `interrupts_raise(on_hold=...)` then run
in a thread (e.g. cancel the Spark jobs, so the round fails at once); `held_signal()` tells the
caller that the failure that follows is the interrupt.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator, Sequence

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Modules whose calls an exception must not interrupt: py4j speaks a request/answer protocol on
# a socket it reuses, and an answer left unread is taken as the next call's.
_FOREIGN_CALLS = ("py4j.",)


class Interrupted(BaseException):
    """The process was asked to stop (a BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way swallows it)."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum   # the shell's convention: 143 for SIGTERM, 130 for SIGINT


class _State:
    armed = False          # interrupts_raise() is active
    shield_depth = 0       # nested shielded() blocks the main thread is in
    signals: tuple = ()
    pending: int | None = None
    raised = False         # Interrupted was raised once: later signals are ignored
    on_hold: Sequence[Callable[[], None]] = ()


_state = _State()


def _inside_foreign_call(frame) -> bool:
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith(_FOREIGN_CALLS):
            return True
        frame = frame.f_back
    return False


def _handler(signum, frame) -> None:
    if _state.raised or _state.pending is not None:
        return
    foreign = _inside_foreign_call(frame)
    if _state.shield_depth or foreign:
        _state.pending = signum
        if foreign:
            for callback in _state.on_hold:
                threading.Thread(target=callback, name="interrupt", daemon=True).start()
        return
    _state.raised = True
    raise Interrupted(signum)


def held_signal() -> int | None:
    """The signal received but not raised yet (it landed in a shielded block or a JVM call)."""
    return _state.pending


@contextlib.contextmanager
def interrupts_raise(signals=SIGNALS,
                     on_hold: Sequence[Callable[[], None]] = ()) -> Iterator[None]:
    """SIGTERM/SIGINT raise Interrupted in the main thread while inside; the previous handlers
    come back afterwards. `on_hold`: run in a thread when a signal lands in a JVM call. Elsewhere
    than the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _handler) for sig in signals}
    _state.armed, _state.pending, _state.raised, _state.shield_depth = True, None, False, 0
    _state.signals = tuple(signals)
    _state.on_hold = tuple(on_hold)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _state.armed, _state.on_hold = False, ()


def reclaim_signals() -> None:
    """Put our handlers back after a library installed its own (a new SparkContext takes SIGINT
    to raise KeyboardInterrupt, possibly in the middle of a JVM call)."""
    if _state.armed and threading.current_thread() is threading.main_thread():
        for sig in _state.signals:
            signal.signal(sig, _handler)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """A signal arriving inside waits until the block is done (a file write must complete)."""
    if not _state.armed or threading.current_thread() is not threading.main_thread():
        yield
        return
    _state.shield_depth += 1
    try:
        yield
    finally:
        _state.shield_depth -= 1
    if _state.shield_depth == 0 and _state.pending is not None and not _state.raised:
        _state.raised = True
        raise Interrupted(_state.pending)
