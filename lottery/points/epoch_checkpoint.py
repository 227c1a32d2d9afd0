"""The last complete epoch of a training run, kept so that a stopped run resumes where it was.

A grid point's runner builds one `EpochCheckpoint` in the point's partial state
(common.paths.GridPaths.partial_state) and passes it to `train_masked` (through
lottery.points.recipe.retrain), which saves every complete epoch there and resumes from it. The
checkpoint outlives the training: a point is only done when its result file exists, so its saved
epochs are kept until then (the scheduler deletes the partial state after writing the result), and
a point stopped after training but before its result was written resumes without retraining.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Mapping

import numpy as np

from common.atomic import atomic_output, write_json

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
STATE_SCHEMA = 1
MAX_STATE_JSON = 64 << 20        # state.json holds the history only: refuse anything larger
_ARRAYS = re.compile(r"^epoch-\d{5}\.npz$")


def mask_digest(mask: Mapping[str, np.ndarray]) -> str:
    """A short fingerprint of a mask (names, shapes, bits): a saved epoch is only resumed under
    the very mask it was trained with."""
    h = hashlib.sha256()
    for name in sorted(mask):
        bits = np.asarray(mask[name], dtype=bool)
        h.update(f"{name}:{bits.shape};".encode())
        h.update(np.packbits(bits, axis=None).tobytes())
    return h.hexdigest()[:16]


def _describe(variables) -> list[list]:
    return [[v.path, list(v.shape)] for v in variables]


def _shapes_of(described) -> list | None:
    try:
        return [list(shape) for _path, shape in described]
    except (TypeError, ValueError):
        return None


class EpochCheckpoint:
    """The last complete epoch of one training run, kept in `directory` (a grid point's
    partial state, GridPaths.partial_state): `epoch-NNNNN.npz` (model and optimizer variables,
    written atomically) and then `state.json` naming it (epoch index, history, variable list,
    `key`). state.json is written last, so it always names a complete epoch.

    `key` identifies the run (point label, IMP round, mask digest): state saved under another
    key is ignored, never resumed. `seed`: each epoch starts from set_random_seed(seed + epoch).
    """

    def __init__(self, directory: str | Path, key: str, seed: int | None = None):
        self.directory = Path(directory)
        self.key = str(key)
        self.seed = seed
        self.resumed_from = 0   # epochs restored by the last load()

    @classmethod
    def for_mask(cls, directory: str | Path, label: str, mask: Mapping[str, np.ndarray],
                 seed: int) -> "EpochCheckpoint":
        """The checkpoint of the run `label` (a point, an IMP round) under `mask`: one directory
        per point, the key tells its runs and masks apart."""
        return cls(directory, key=f"{label}|{mask_digest(mask)}", seed=seed)

    @property
    def state_path(self) -> Path:
        return self.directory / STATE_FILE

    def _read_state(self) -> dict | None:
        try:
            size = self.state_path.stat().st_size
        except FileNotFoundError:
            return None
        if size > MAX_STATE_JSON:
            raise ValueError(f"{self.state_path}: {size} bytes, more than a partial state holds")
        with open(self.state_path, "rb") as fh:
            state = json.load(fh)
        if not isinstance(state, dict) or state.get("schema_version") != STATE_SCHEMA:
            raise ValueError(f"{self.state_path}: not a partial-state file of schema {STATE_SCHEMA}")
        return state

    def load(self, model, optimizer) -> tuple[int, dict[str, list[float]]] | None:
        """Restore the saved epoch into the compiled `model` and its `optimizer`; returns
        (epochs done, history), or None when there is nothing of this run to resume."""
        self.resumed_from = 0
        state = self._read_state()
        if state is None:
            return None
        if state.get("key") != self.key:
            log.warning("%s: saved for %r, not %r: starting from scratch", self.state_path,
                        state.get("key"), self.key)
            return None
        name = str(state.get("arrays", ""))
        if not _ARRAYS.match(name):  # a file name of our own making, never a path
            raise ValueError(f"{self.state_path}: field arrays {name!r} is not an epoch file name")
        optimizer.build(model.trainable_variables)
        # Matched by order and shape: Keras numbers auto-named layers per process ("dense_3"),
        # so paths of the same architecture may differ between the saving and the resuming run.
        if (_shapes_of(state.get("model_variables")) != _shapes_of(_describe(model.variables))
                or _shapes_of(state.get("optimizer_variables"))
                != _shapes_of(_describe(optimizer.variables))):
            log.warning("%s: saved variables do not match this model/optimizer: starting from "
                        "scratch", self.state_path)
            return None
        with np.load(self.directory / name, allow_pickle=False) as arrays:
            for i, var in enumerate(model.variables):
                var.assign(arrays[f"m{i:05d}"])
            for i, var in enumerate(optimizer.variables):
                var.assign(arrays[f"o{i:05d}"])
        history = {str(k): [float(x) for x in v] for k, v in state["history"].items()}
        self.resumed_from = int(state["epochs_done"])
        return self.resumed_from, history

    def save(self, model, optimizer, epochs_done: int, history: Mapping[str, list[float]]) -> None:
        name = f"epoch-{epochs_done:05d}.npz"
        arrays = {f"m{i:05d}": np.asarray(v.numpy()) for i, v in enumerate(model.variables)}
        arrays |= {f"o{i:05d}": np.asarray(v.numpy()) for i, v in enumerate(optimizer.variables)}
        with atomic_output(self.directory / name) as fh:
            np.savez(fh, **arrays)
        write_json(self.state_path, {
            "schema_version": STATE_SCHEMA, "key": self.key, "epochs_done": int(epochs_done),
            "arrays": name, "history": {k: list(v) for k, v in history.items()},
            "model_variables": _describe(model.variables),
            "optimizer_variables": _describe(optimizer.variables), "saved_at": time.time()})
        for old in self.directory.glob("epoch-*.npz"):  # only the epoch state.json names
            if old.name != name:
                old.unlink(missing_ok=True)

    def clear(self) -> None:
        """Forget the saved epoch, once what it trained is kept elsewhere (an IMP round's result
        in its mask file): state.json first, so no reader ever sees a state naming a deleted file."""
        self.state_path.unlink(missing_ok=True)
        for old in self.directory.glob("epoch-*.npz"):
            old.unlink(missing_ok=True)
        try:
            self.directory.rmdir()
        except OSError:
            pass  # not empty (another key's leftovers) or already gone
