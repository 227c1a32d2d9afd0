"""The files of a dense run directory that the driver loop reads and writes (checkpoints are
`train.checkpoints`, the Early-Bird files `train.early_bird`).

    settings.json   the resolved settings, the dataset's manifest sha256, steps per epoch and
                    the rewind points' steps; a re-run refuses a directory of other settings
    history.csv     one row per complete epoch (HISTORY_COLUMNS)
    resume/         state.json + epoch-NNNNN.weights.h5: the last complete epoch of an
                    unfinished run (removed once the run is complete)
    model.keras     the final model

Resume: after every epoch the chief saves the weights and optimizer state to `resume/`, then
history.csv, then `resume/state.json` naming the epoch: the state file is written last, so
whatever it names is complete.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from common.atomic import atomic_path, read_json, write_json, write_text
from common.paths import DenseRunPaths
from common.settings import SCHEMA_VERSION, settings_to_dict
from train.checkpoints import save_weights_atomic
from train.data import DatasetInfo, describe
from train.settings import LATER_FIELD_DEFAULTS, NON_IDENTITY_FIELDS, DenseSettings

HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "time_s",
                   "images_per_s")
# Later columns (empty where a run has no value): top-5 (train.metrics), BatchNorm
# recalibration before the epoch's evaluation and the chance-level flag (train.bn_recalibration,
# train.chance_check); flags are 1.0/0.0, as read_history reads every column as a number.
HISTORY_COLUMNS += ("top5_accuracy", "val_top5_accuracy", "bn_recalibrated",
                    "val_accuracy_before_bn_recalibration", "val_at_chance")
# Gradual pruning (train.gmp): realised sparsity at the epoch's end; steps loss scaling skipped.
HISTORY_COLUMNS += ("sparsity", "skipped_steps")


# ---------------------------------------------------------------------------------- history.csv
def history_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=HISTORY_COLUMNS, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in HISTORY_COLUMNS})
    return out.getvalue()


def write_history(run: DenseRunPaths, rows: list[dict]) -> None:
    write_text(run.history, history_text(rows))


def read_history(run: DenseRunPaths) -> list[dict]:
    if not run.history.is_file():
        return []
    with open(run.history, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [{k: (int(v) if k == "epoch" else float(v)) for k, v in r.items() if v not in ("", None)}
            for r in rows]


# -------------------------------------------------------------------------------- settings.json
def settings_record(settings: DenseSettings, info: DatasetInfo, steps_per_epoch: int,
                    rewinds: dict[str, int]) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "settings": settings_to_dict(settings),
        "manifest_sha256": info.manifest_sha256,
        "dataset": describe(info),
        "num_classes": info.num_classes,
        "classes": list(info.classes),
        "steps_per_epoch": steps_per_epoch,
        "total_steps": steps_per_epoch * settings.epochs,
        "rewind_steps": rewinds,
    }


def _without_later_defaults(values: dict) -> dict:
    """Settings minus the later fields that sit at their defaults (absent from older records)."""
    return {k: v for k, v in values.items()
            if not (k in LATER_FIELD_DEFAULTS and v == LATER_FIELD_DEFAULTS[k])}


def record_identity(record: dict) -> dict:
    """The parts of a settings record that must match for a run directory to be reused."""
    settings = {k: v for k, v in _without_later_defaults(record["settings"]).items()
                if k not in NON_IDENTITY_FIELDS}
    # "bn_momentum" reports the momentum in use (train.models.resolve_bn_momentum); an auto
    # value that differs from the default is in settings.model_options, so it is identity there.
    return {**{k: v for k, v in record.items() if k not in ("dataset", "bn_momentum")},
            "settings": settings}


def write_settings(run: DenseRunPaths, record: dict) -> None:
    """Write settings.json, or check that the one there describes the same run."""
    if run.settings.is_file():
        if record_identity(read_json(run.settings)) != record_identity(record):
            raise ValueError(f"{run.settings}: the run directory holds different settings; "
                             f"refusing to mix two runs")
        return
    write_json(run.settings, record)


# ------------------------------------------------------------------------------ model and resume
def save_model_atomic(model, path: Path) -> None:
    with atomic_path(path, ".keras") as tmp:  # Keras insists on the suffix
        model.save(str(tmp))


class ResumeState:
    """resume/state.json + resume/epoch-NNNNN.weights.h5: the last complete epoch."""

    def __init__(self, run: DenseRunPaths):
        self.run = run
        self.state_path = run.resume / "state.json"

    def load(self) -> tuple[int, Path | None]:
        """(complete epochs, their weights file) or (0, None) for a run not started."""
        if not self.state_path.is_file():
            return 0, None
        state = read_json(self.state_path)
        weights = self.run.resume / state["weights"]
        if not weights.is_file():
            raise FileNotFoundError(f"{self.state_path}: names {weights}, which is missing")
        return int(state["epochs_done"]), weights

    def save(self, model, epochs_done: int, history: list[dict]) -> None:
        name = f"epoch-{epochs_done:05d}.weights.h5"
        save_weights_atomic(model, self.run.resume / name)
        write_history(self.run, history)
        write_json(self.state_path, {"epochs_done": epochs_done, "weights": name})
        for old in self.run.resume.glob("epoch-*.weights.h5"):  # keep only the named one
            if old.name != name:
                old.unlink(missing_ok=True)
