"""The preemption stop token: a cooperative "stop after the current batch" passed explicitly.

Whoever owns the process (the grid scheduler on SIGTERM/SIGUSR1, a test) creates one `StopToken`
and hands it to the work it starts; training checks it after every batch and raises `Preempted`.
Setting it is safe from a signal handler (it only sets a `threading.Event`).
"""
from __future__ import annotations

import threading


class Preempted(Exception):
    """Work stopped on request; its last complete epoch is saved (when it had a checkpoint)."""


class StopToken:
    """A one-way flag: requested once, it stays set (a new run takes a new token)."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def request(self) -> None:
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def raise_if_requested(self, where: str = "") -> None:
        if self._event.is_set():
            raise Preempted(f"stop requested{' ' + where if where else ''}")
