"""TensorFlow's native start-up lines, silenced for the command line.

On a host without a GPU, importing TensorFlow prints a dozen lines from C++ (cuInit failures,
"Unable to register cuDNN/cuFFT/cuBLAS factory", oneDNN and CPU-feature notices) that read as
failures but say nothing about the run. `quiet_tensorflow()` raises TensorFlow's C++ log threshold
(TF_CPP_MIN_LOG_LEVEL=3, unless the user set a level) and silences file descriptor 2 while
TensorFlow itself is imported (absl prints its registration errors before any log level
applies). It must run before anything imports TensorFlow; TensorFlow is imported lazily, so it
costs nothing to commands that never import it. Python exceptions and our own logging are
untouched. `BIGTICKET_LOG_LEVEL=DEBUG` keeps every native line.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import os
import sys
from typing import Iterator

_MODULE = "tensorflow"


def verbose_requested(env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return env.get("BIGTICKET_LOG_LEVEL", "").upper() == "DEBUG"


def quiet_tensorflow() -> None:
    """Silence TensorFlow's native start-up output in this process (and Spark workers, which
    inherit the environment), unless verbose output was asked for or TensorFlow is loaded."""
    if verbose_requested():
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if _MODULE in sys.modules or any(isinstance(f, _QuietImport) and not f.done
                                     for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietImport())


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """File descriptor 2 points at /dev/null inside (C++ writes to it directly)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):   # no usable stderr: nothing to silence
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class _QuietLoader(importlib.abc.Loader):
    """Runs the real loader of `tensorflow` with stderr silenced, then steps aside."""

    def __init__(self, inner: importlib.abc.Loader):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        try:
            with _stderr_silenced():
                self.inner.exec_module(module)
        finally:
            module.__loader__ = self.inner
            if getattr(module, "__spec__", None) is not None:
                module.__spec__.loader = self.inner


class _QuietImport(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` once, through the other finders, and wraps its loader."""

    def __init__(self) -> None:
        self.done = False

    def find_spec(self, name, path=None, target=None):
        if name != _MODULE or self.done:
            return None
        self.done = True   # once: later imports find the module in sys.modules
        for finder in [f for f in sys.meta_path if f is not self]:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _QuietLoader(spec.loader)
                return spec
        return None
