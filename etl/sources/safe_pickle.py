"""A restricted unpickler for data files such as CIFAR's python batches.

A pickle can name any importable callable and have the loader call it, so a crafted data file can
run code. This unpickler resolves only the globals that rebuilding NumPy arrays and plain
containers needs; any other global is refused before anything is called.
"""
from __future__ import annotations

import io
import pickle
from typing import Any

# (module, name) pairs a NumPy array pickle refers to. `_codecs.encode` is how Python 3 writes
# bytes at protocol <= 2 (it only turns a str into bytes); numpy 2 renames numpy.core to
# numpy._core.
ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),   # protocol 5 arrays
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "bytearray"),
    # Python 2 pickles name the builtins module __builtin__ (pickle maps it to builtins).
    ("__builtin__", "set"),
    ("__builtin__", "frozenset"),
    ("__builtin__", "bytearray"),
})

MAX_PICKLE_BYTES = 512 * 1024 * 1024


class RefusedPickle(ValueError):
    """A pickle that names a global outside ALLOWED_GLOBALS (or is otherwise unacceptable)."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise RefusedPickle(f"refused pickle global {module}.{name}")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedPickle("refused pickle persistent id")


def safe_loads(data: bytes, origin: str) -> Any:
    """Unpickle `data` admitting only NumPy arrays and plain containers.

    `origin` (a file name) is put in every error. Python 2 pickles (CIFAR's) are read with
    encoding='bytes', so their str keys come back as bytes, as the CIFAR page documents.
    """
    if len(data) > MAX_PICKLE_BYTES:
        raise RefusedPickle(f"{origin}: pickle larger than {MAX_PICKLE_BYTES} bytes")
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except RefusedPickle as err:
        raise RefusedPickle(f"{origin}: {err}") from None
    except Exception as err:  # noqa: BLE001 - any failure of a malformed pickle is one error
        raise ValueError(f"{origin}: not a readable pickle ({type(err).__name__}: {err})") from None
