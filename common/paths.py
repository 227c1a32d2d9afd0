"""Every on-disk path of the contracts in docs/ARCHITECTURE.md, built in one place.

Stages never join path strings themselves: they ask these classes, so a contract change is one edit.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

SUCCESS = "_SUCCESS"
EARLY_BIRD_CHECKPOINT = "early_bird"  # checkpoint name of a dense run's Early-Bird ticket


def is_safe_name(text: str) -> bool:
    """Usable as one file name under an output directory: no separators, no hidden or empty names,
    nothing a shell would mangle (ids of tasks and masks become file names: no path traversal)."""
    return (bool(text) and not text.startswith(".") and len(text) <= 200
            and all(c.isalnum() or c in "-_." for c in text))


def shard_stem(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}"


@dataclasses.dataclass(frozen=True)
class DatasetPaths:
    """The ETL output directory (dataset schema_version 1)."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine.jsonl"

    @property
    def success(self) -> Path:
        return self.root / SUCCESS

    @property
    def staging(self) -> Path:
        """Per-shard sidecars (counts, checksums, quarantined records) committed by shard tasks."""
        return self.root / "_staging"

    def source_cache(self, name: str) -> Path:
        """Inputs a source materialises itself (the digits folder tree), reused by re-runs."""
        return self.root / "_source" / name

    def split_dir(self, split: str) -> Path:
        return self.root / split

    def shard(self, split: str, index: int, count: int, fmt: str) -> Path:
        ext = {"tfrecord": "tfrecord", "parquet": "parquet"}[fmt]
        return self.split_dir(split) / f"{shard_stem(index, count)}.{ext}"

    def shard_sidecar(self, split: str, index: int, count: int) -> Path:
        return self.staging / split / f"{shard_stem(index, count)}.json"


@dataclasses.dataclass(frozen=True)
class DenseRunPaths:
    """runs/dense-<hash>/ written by the dense training stage."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def under(cls, runs_root: str | Path, settings_hash: str) -> "DenseRunPaths":
        return cls(Path(runs_root) / f"dense-{settings_hash}")

    @property
    def settings(self) -> Path:
        return self.root / "settings.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, name: str) -> Path:
        """name is 'init', 'final' or a rewind label such as '3ep' or '500it'."""
        return self.checkpoints / f"{name}.weights.h5"

    @property
    def history(self) -> Path:
        return self.root / "history.csv"

    @property
    def model(self) -> Path:
        return self.root / "model.keras"

    @property
    def resume(self) -> Path:
        """Driver-side resume state (last complete epoch) for killed runs."""
        return self.root / "resume"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def early_bird(self) -> Path:
        """Early-Bird detector state and outcome: settings, per-epoch distances, drawn epoch."""
        return self.root / "early_bird.json"

    @property
    def early_bird_masks(self) -> Path:
        """The BatchNorm channel mask of every epoch (`epoch_0001` -> bool vector), for the heat map."""
        return self.root / "early_bird_masks.npz"

    @property
    def success(self) -> Path:
        return self.root / SUCCESS


@dataclasses.dataclass(frozen=True)
class GridPaths:
    """runs/dense-<hash>/lottery-<hash>/ written by the lottery stage."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def under(cls, run: DenseRunPaths, settings_hash: str) -> "GridPaths":
        return cls(run.root / f"lottery-{settings_hash}")

    @property
    def settings(self) -> Path:
        return self.root / "settings.json"

    @property
    def stats(self) -> Path:
        return self.root / "stats.json"

    @property
    def masks(self) -> Path:
        return self.root / "masks"

    def mask(self, mask_id: str) -> Path:
        return self.masks / f"{mask_id}.npz"

    @property
    def results(self) -> Path:
        return self.root / "results"

    def result(self, task_id: str) -> Path:
        return self.results / f"{task_id}.json"

    @property
    def claims(self) -> Path:
        return self.root / "claims"

    def claim(self, task_id: str) -> Path:
        return self.claims / f"{task_id}.claim"

    @property
    def partial(self) -> Path:
        return self.root / "partial"

    def partial_state(self, task_id: str) -> Path:
        """A running point's last complete epoch (weights, optimizer, history), for resumption."""
        return self.partial / task_id

    @property
    def models(self) -> Path:
        return self.root / "models"

    def compact_model(self, task_id: str) -> Path:
        """The physically smaller model a structured point trained (Keras format)."""
        return self.models / f"{task_id}.keras"

    def compact_litert(self, task_id: str) -> Path:
        """The same model exported for CPU deployment (LiteRT flatbuffer, the batch it was timed at)."""
        return self.models / f"{task_id}.tflite"

    def point_target(self, task_id: str) -> Path:
        """Where `bigticket quantize` puts a point's LiteRT exports (QuantizedPaths)."""
        return self.models / task_id

    @property
    def results_parquet(self) -> Path:
        return self.root / "results.parquet"

    @property
    def results_csv(self) -> Path:
        return self.root / "results.csv"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def plots(self) -> Path:
        return self.root / "plots"


@dataclasses.dataclass(frozen=True)
class VaeStudyPaths:
    """out/vae-<hash>/ written by the VAE neuron-pruning study (lottery.vae.study)."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def under(cls, out: str | Path, study_hash: str) -> "VaeStudyPaths":
        return cls(Path(out) / f"vae-{study_hash}")

    @property
    def settings(self) -> Path:
        return self.root / "settings.json"

    @property
    def trained_weights(self) -> Path:
        return self.root / "trained.weights.h5"

    @property
    def trained(self) -> Path:
        return self.root / "trained.json"

    @property
    def rows(self) -> Path:
        return self.root / "rows"

    def row(self, rid: str) -> Path:
        if not re.fullmatch(r"[a-z0-9]+-r\d{4}", rid):  # ids become file names
            raise ValueError(f"bad row id {rid!r}")
        return self.rows / f"{rid}.json"

    @property
    def results_json(self) -> Path:
        return self.root / "results.json"

    @property
    def results_csv(self) -> Path:
        return self.root / "results.csv"


@dataclasses.dataclass(frozen=True)
class QuantizedPaths:
    """<target>/quantized/: a model's LiteRT exports and their measurements (`bigticket quantize`).

    The target of a dense run is the run directory for its final weights and
    `checkpoint-<label>/` inside it for another checkpoint; of a grid point `models/<task_id>/`."""

    target: Path

    def __post_init__(self):
        object.__setattr__(self, "target", Path(self.target))

    @classmethod
    def for_run(cls, run: DenseRunPaths, label: str = "final") -> "QuantizedPaths":
        return cls(run.root if label == "final" else run.root / f"checkpoint-{label}")

    @classmethod
    def for_point(cls, grid: GridPaths, task_id: str) -> "QuantizedPaths":
        return cls(grid.point_target(task_id))

    @property
    def root(self) -> Path:
        return self.target / "quantized"

    def model(self, variant: str) -> Path:
        return self.root / f"{variant}.tflite"

    @property
    def results(self) -> Path:
        return self.root / "results.json"
