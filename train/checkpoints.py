"""Rewind (late-reset) points and the checkpoint files of a dense run.

A rewind point is written `<N>ep` (after N epochs) or `<N>it` (after N optimizer steps); `0ep` and
`0it` are the initialisation. Points become global step numbers once steps per epoch are known.
Checkpoints are Keras `.weights.h5` files (with the optimizer's state once the model is compiled),
written under a temporary name and renamed: Keras writes in place, so a kill mid-write would
otherwise leave a truncated file under the final name.

A checkpoint whose bytes equal another's of the same run (`0ep` and `init`: both the initial
weights) is stored as a hard link to it, not a second copy (70 MB each for conv_small at 64 px);
where the file system has no hard links it stays a copy. Links are safe because no checkpoint is
ever written in place: every write is a new file renamed over the name, and deleting one name
leaves the other.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Iterable

from common.atomic import atomic_path, read_json, temp_name
from common.paths import EARLY_BIRD_CHECKPOINT, DenseRunPaths
from train.models import build_model

log = logging.getLogger(__name__)

_POINT = re.compile(r"^(\d{1,9})(ep|it)$")


@dataclasses.dataclass(frozen=True)
class RewindPoint:
    count: int
    unit: str  # "ep" or "it"

    @classmethod
    def parse(cls, text: str) -> "RewindPoint":
        match = _POINT.match(str(text).strip().lower())
        if not match:
            raise ValueError(f"rewind: {text!r} is not a rewind point (write e.g. 0ep, 3ep or 500it)")
        return cls(int(match.group(1)), match.group(2))

    @property
    def label(self) -> str:
        return f"{self.count}{self.unit}"

    def step(self, steps_per_epoch: int) -> int:
        return self.count * steps_per_epoch if self.unit == "ep" else self.count


def is_checkpoint_label(label: str) -> bool:
    """'init', 'final' or a rewind point label such as '3ep' or '500it' (lower case, as saved)."""
    return label in ("init", "final") or _POINT.match(label) is not None


def rewind_steps(points: Iterable[str], steps_per_epoch: int, total_steps: int) -> dict[str, int]:
    """label -> global step; ValueError naming the point when it lies past the end of training."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps per epoch must be >= 1, got {steps_per_epoch}")
    out = {}
    for text in points:
        point = RewindPoint.parse(text)
        step = point.step(steps_per_epoch)
        if step > total_steps:
            raise ValueError(
                f"rewind: {point.label} is step {step}, past the end of training "
                f"({total_steps} steps = epochs x {steps_per_epoch} steps per epoch)")
        out[point.label] = step
    return out


def save_weights_atomic(model, path: str | os.PathLike) -> Path:
    """model.save_weights to a hidden temporary sibling, then rename over `path`."""
    with atomic_path(path, ".weights.h5") as tmp:
        model.save_weights(str(tmp))
    return Path(path)


def save_checkpoint(model, run: DenseRunPaths, name: str) -> Path:
    """Checkpoint `name` of the run, atomically; a hard link to an identical checkpoint if any."""
    path = run.checkpoint(name)
    with atomic_path(path, ".weights.h5") as tmp:
        model.save_weights(str(tmp))
        twin = _link_to_identical(tmp, path)
    log.info("checkpoint %s -> %s%s", name, path, f" (a hard link to {twin.name}: same bytes)" if twin else "")
    return path


_CHUNK = 1 << 20


def _same_bytes(a, b) -> bool:
    """Two open binary files hold the same bytes (stops at the first differing chunk)."""
    while True:
        x, y = a.read(_CHUNK), b.read(_CHUNK)
        if x != y:
            return False
        if not x:
            return True


def _link_to_identical(tmp: Path, final: Path) -> Path | None:
    """Replace the freshly written `tmp` by a hard link to a checkpoint beside `final` with the
    same bytes; returns that checkpoint, or None (no twin, or no hard links here: `tmp` stays)."""
    size = tmp.stat().st_size
    suffix = ".weights.h5"
    for other in sorted(final.parent.iterdir()):
        if other.name == final.name or other.name.startswith(".") or not other.name.endswith(suffix):
            continue
        try:
            if other.stat().st_size != size:
                continue
            theirs = open(other, "rb")
        except OSError:  # gone, or not a readable file: not a twin
            continue
        with theirs, open(tmp, "rb") as ours:
            if not _same_bytes(theirs, ours):
                continue
            inode = os.fstat(theirs.fileno()).st_ino
            link = temp_name(final, "link")
            link.unlink()  # os.link needs a free name; temp_name reserved a unique one
            try:
                os.link(other, link)
                if os.stat(link).st_ino != inode:  # replaced since it was compared: keep the copy
                    raise FileExistsError(other)
                os.replace(link, tmp)
            except OSError as err:
                link.unlink(missing_ok=True)
                log.debug("%s: kept as a copy (%s)", final, err)
                return None
        return other
    return None


def list_checkpoints(run: DenseRunPaths) -> list[str]:
    """Names of the complete checkpoints of a run (temporary files are hidden and excluded)."""
    if not run.checkpoints.is_dir():
        return []
    suffix = ".weights.h5"
    return sorted(p.name[: -len(suffix)] for p in run.checkpoints.iterdir()
                  if p.name.endswith(suffix) and not p.name.startswith("."))


def load_checkpoint(run_dir: str | os.PathLike, name: str):
    """Rebuild the run's model from its settings.json and load checkpoint `name` into it.

    For the lottery stage: returns an uncompiled keras.Model (optimizer state in the file is
    not restored). `name` is 'init', 'final', EARLY_BIRD_CHECKPOINT (the drawn Early-Bird ticket)
    or a rewind label such as '3ep'.
    """
    run = DenseRunPaths(Path(run_dir))
    if not run.settings.is_file():
        raise FileNotFoundError(f"{run.settings}: not a dense run directory (no settings.json)")
    if name not in ("init", "final", EARLY_BIRD_CHECKPOINT):
        name = RewindPoint.parse(name).label
    path = run.checkpoint(name)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint {name!r} (have: {list_checkpoints(run)})")
    saved = read_json(run.settings)
    settings = saved["settings"]
    model = build_model(settings["model"], saved["num_classes"], settings["input_size"],
                        **settings.get("model_options", {}))
    # skip_mismatch=False: a file from another architecture must fail loudly. The file may hold
    # optimizer variables; an uncompiled model has no optimizer, so Keras ignores them.
    model.load_weights(str(path))
    return model
