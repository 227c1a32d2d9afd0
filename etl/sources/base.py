"""The protocol every source implements.

The driver calls `classes()`, `describe()` and `units()` (cheap: no image is read). Executors call
`records(unit)` to enumerate a unit's inputs (names only) and `open_unit(unit)` to read their
bytes. Enumeration runs once per job, but again for a retried task, so it must be cheap and
deterministic.
"""
from __future__ import annotations

import abc
import contextlib
from typing import Any, Callable, Iterator

import numpy as np

from etl.records import ClassInfo, InputRecord

# A payload is encoded image bytes, or an HxWx3 / HxW uint8 array (CIFAR's raw pixels).
Payload = bytes | np.ndarray
Loader = Callable[[InputRecord], Payload]


class Source(abc.ABC):
    name: str = ""

    @abc.abstractmethod
    def classes(self) -> list[ClassInfo]:
        """Classes in label order (index from 0)."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """A JSON-able description for the manifest (kind, input path, options)."""

    @abc.abstractmethod
    def units(self) -> list[Any]:
        """Picklable units of work, each enumerated and read by one task."""

    @abc.abstractmethod
    def records(self, unit: Any) -> Iterator[InputRecord]:
        """Every input of a unit, in a stable order; bad entries carry `reject`."""

    @contextlib.contextmanager
    def open_unit(self, unit: Any) -> Iterator[Loader]:
        """A loader for the unit's records; raises etl.records.Rejected for an unreadable input."""
        yield self.load

    def load(self, record: InputRecord) -> Payload:  # pragma: no cover - overridden
        raise NotImplementedError
