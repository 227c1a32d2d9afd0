"""One logging set-up for every entry point (CLI, spark-submit driver, MPI ranks)."""
from __future__ import annotations

import logging
import os

_FORMAT = "%(asctime)s %(levelname)s %(name)s%(rank)s: %(message)s"


class _RankFilter(logging.Filter):
    """Prefix records with the MPI/SLURM rank when there is more than one process."""

    def __init__(self, rank: int | None):
        super().__init__()
        self._rank = "" if rank is None else f"[rank {rank}]"

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self._rank
        return True


def setup_logging(level: str | int | None = None, rank: int | None = None) -> None:
    """Configure the root logger once; BIGTICKET_LOG_LEVEL overrides the default INFO."""
    level = level or os.environ.get("BIGTICKET_LOG_LEVEL", "INFO")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_bigticket", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler()
    handler._bigticket = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_RankFilter(rank))
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
    # Spark's py4j and TensorFlow's absl chatter drowns our own progress lines.
    for noisy in ("py4j", "absl", "matplotlib", "PIL", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
