"""One logging set-up for every entry point (CLI, spark-submit driver, MPI ranks).

Log lines go to stderr, so that stdout holds only what a command prints for scripts (a dataset,
run or grid directory), also under spark-submit (see `separate_stderr_under_spark_submit`).
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import threading

_FORMAT = "%(asctime)s %(levelname)s %(name)s%(rank)s: %(message)s"


class _RankFilter(logging.Filter):
    """Prefix records with the MPI/SLURM rank when there is more than one process."""

    def __init__(self, rank: int | None):
        super().__init__()
        self._rank = "" if rank is None else f"[rank {rank}]"

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self._rank
        return True


_CHUNK = 65536
_forwarding: threading.Thread | None = None


def _forward(read_fd: int, jvm_stderr, fallback_fd: int) -> None:
    """Copy the pipe behind fd 2 to the JVM's System.err until the pipe closes; if the JVM
    cannot take it, to `fallback_fd` (the merged stream: moved, never lost)."""
    target = jvm_stderr
    while data := os.read(read_fd, _CHUNK):
        if target is not None:
            try:
                target.write(bytearray(data), 0, len(data))
                target.flush()
                continue
            except Exception:  # the gateway went away: keep the bytes, give up the JVM
                target = None
        os.write(fallback_fd, data)
    os.close(read_fd)


def _stop_forwarding(merged_fd: int, thread: threading.Thread) -> None:
    """At exit: put the original fd 2 back (closing the pipe's last writer) and drain the pipe."""
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os.dup2(merged_fd, 2)
    thread.join(timeout=10)


def separate_stderr_under_spark_submit() -> None:
    """Under spark-submit, keep this process's stderr apart from its stdout.

    spark-submit starts a Python driver with its stderr merged into its stdout (Spark's
    PythonRunner redirects the error stream), so log lines would land among the paths a command
    prints for scripts. There (the process is a JVM's child: PYSPARK_GATEWAY_PORT is set), fd 2
    becomes a pipe that a thread copies to the JVM's own System.err, which is spark-submit's real
    stderr; every writer of fd 2 (logging, tqdm, tracebacks, native libraries) is covered.
    Elsewhere nothing changes. Idempotent.
    """
    global _forwarding
    port, secret = os.environ.get("PYSPARK_GATEWAY_PORT"), os.environ.get("PYSPARK_GATEWAY_SECRET")
    if _forwarding is not None or not port or not secret:
        return
    try:
        from py4j.java_gateway import GatewayParameters, JavaGateway

        gateway = JavaGateway(gateway_parameters=GatewayParameters(
            port=int(port), auth_token=secret, auto_convert=False))
        jvm_stderr = gateway.jvm.System.err
        jvm_stderr.flush()  # one round trip now: a gateway that does not answer is found here
    except Exception as err:  # stay merged rather than fail the command
        logging.getLogger(__name__).warning("log lines stay on stdout: no JVM gateway (%s)", err)
        return
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    merged_fd = os.dup(2)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    _forwarding = threading.Thread(target=_forward, args=(read_fd, jvm_stderr, merged_fd),
                                   name="stderr-to-spark-submit", daemon=True)
    _forwarding.start()
    atexit.register(_stop_forwarding, merged_fd, _forwarding)


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is when a record is emitted, not when the handler was made: a
    stream replaced later (contextlib.redirect_stderr, a test's capture) and since closed would
    otherwise turn every log line into a logging error."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(level: str | int | None = None, rank: int | None = None) -> None:
    """Configure the root logger once; BIGTICKET_LOG_LEVEL overrides the default INFO."""
    separate_stderr_under_spark_submit()
    level = level or os.environ.get("BIGTICKET_LOG_LEVEL", "INFO")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_bigticket", False):
            root.removeHandler(handler)
    handler = _CurrentStderrHandler()
    handler._bigticket = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_RankFilter(rank))
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
    # Spark's py4j and TensorFlow's absl chatter drowns our own progress lines.
    for noisy in ("py4j", "absl", "matplotlib", "PIL", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
