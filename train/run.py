"""`train_dense`: the driver loop that writes a dense run directory (DESIGN.md "Dense run directory").

Also here: `ElephasEngine`, the driver side of the elephas engine (rounds of
`train.elephas_engine.SparkDataParallel`), next to the local engines' `train.local_engine`.

The driver owns the epoch loop for every engine: learning rate, evaluation, history, TensorBoard,
checkpoints (init, rewind points, final), early stopping and resume. Engines only train, one epoch
at a time, pausing at the exact steps the driver names so it can save rewind checkpoints.

Resume: after every epoch the chief saves the weights and optimizer state (one `.weights.h5`) to
`resume/`, then history.csv, then `resume/state.json` naming the epoch: the state file is written
last, so whatever it names is complete. A re-run loads it and continues with epoch k+1; since the
data order and augmentation derive from (seed, epoch), the final weights equal an uninterrupted
run's.

Early-Bird (settings.early_bird): after every epoch, before the resume state names it, the
detector of `train.early_bird` writes early_bird.json and early_bird_masks.npz (and checkpoint
"early_bird" when the ticket is drawn); a resumed run replays them up to its last complete epoch.
With stop_at_early_bird the loop ends at the ticket and the run completes as usual.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from common.atomic import atomic_path, read_json, write_json, write_text
from common.paths import DenseRunPaths
from common.settings import SCHEMA_VERSION, settings_hash, settings_to_dict
from train.checkpoints import rewind_steps, save_checkpoint, save_weights_atomic
from train.data import DatasetInfo, describe, open_dataset
from train.settings import LATER_FIELD_DEFAULTS, NON_IDENTITY_FIELDS, DenseSettings
from train.schedules import lr_at

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "time_s",
                   "images_per_s")


# ---------------------------------------------------------------------------------------------
# settings resolved against the dataset

def resolve_settings(settings: DenseSettings, info: DatasetInfo) -> DenseSettings:
    """Fill the defaults that come from the dataset and check settings against it.

    ValueError names the setting: format not in the dataset, classes vs model, input size.
    """
    fmt = settings.format or info.default_format
    if fmt not in info.formats:
        raise ValueError(f"format: dataset {info.root} has no {fmt!r} shards "
                         f"(has {', '.join(info.formats)})")
    for split in ("train", "validation"):
        if info.records.get(split, 0) < 1:
            raise ValueError(f"data: dataset {info.root} has no {split!r} records")
    if settings.num_classes is not None and settings.num_classes != info.num_classes:
        raise ValueError(f"num_classes: the model is set for {settings.num_classes} classes but "
                         f"dataset {info.root} has {info.num_classes}")
    input_size = settings.input_size or info.image_size
    if input_size is None:
        raise ValueError(f"input_size: dataset {info.root} has images of varying size "
                         f"({info.manifest['resize']}); set input_size")
    return dataclasses.replace(settings, format=fmt, input_size=input_size,
                               num_classes=info.num_classes)


def run_hash(settings: DenseSettings, info: DatasetInfo) -> str:
    """The run's identity: resolved settings minus where/how fields, plus the dataset's manifest."""
    canonical = dataclasses.replace(settings, **{f: None if f == "master" else "" for f in
                                                 NON_IDENTITY_FIELDS})
    # Fields added since the first runs are left out while at their defaults, so those runs keep
    # their directory names.
    return settings_hash(canonical, {"manifest_sha256": info.manifest_sha256},
                         omit=LATER_FIELD_DEFAULTS)


def _without_later_defaults(values: dict) -> dict:
    """Settings minus the later fields that sit at their defaults (absent from older records)."""
    return {k: v for k, v in values.items()
            if not (k in LATER_FIELD_DEFAULTS and v == LATER_FIELD_DEFAULTS[k])}


# ---------------------------------------------------------------------------------------------
# run directory files

def _history_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=HISTORY_COLUMNS, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in HISTORY_COLUMNS})
    return out.getvalue()


def read_history(run: DenseRunPaths) -> list[dict]:
    if not run.history.is_file():
        return []
    with open(run.history, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [{k: (int(v) if k == "epoch" else float(v)) for k, v in r.items() if v not in ("", None)}
            for r in rows]


def _settings_record(settings: DenseSettings, info: DatasetInfo, steps_per_epoch: int,
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


def _identity(record: dict) -> dict:
    """The parts of a settings record that must match for a run directory to be reused."""
    settings = {k: v for k, v in _without_later_defaults(record["settings"]).items()
                if k not in NON_IDENTITY_FIELDS}
    return {**{k: v for k, v in record.items() if k != "dataset"}, "settings": settings}


def _write_settings(run: DenseRunPaths, record: dict) -> None:
    if run.settings.is_file():
        if _identity(read_json(run.settings)) != _identity(record):
            raise ValueError(f"{run.settings}: the run directory holds different settings; "
                             f"refusing to mix two runs")
        return
    write_json(run.settings, record)


def _save_model_atomic(model, path: Path) -> None:
    with atomic_path(path, ".keras") as tmp:  # Keras insists on the suffix
        model.save(str(tmp))


class _Resume:
    """resume/state.json + resume/epoch-NNNNN.weights.h5: the last complete epoch."""

    def __init__(self, run: DenseRunPaths):
        self.run = run
        self.state_path = run.resume / "state.json"

    def load(self) -> tuple[int, Path | None]:
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
        write_text(self.run.history, _history_text(history))
        write_json(self.state_path, {"epochs_done": epochs_done, "weights": name})
        for old in self.run.resume.glob("epoch-*.weights.h5"):  # keep only the named one
            if old.name != name:
                old.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# engines

def steps_per_epoch(settings: DenseSettings, info: DatasetInfo) -> int | None:
    """Optimizer steps per epoch as the engine will count them (None: known once the
    multiworker cluster is up). elephas: one pass of the worker with the most records."""
    if settings.engine == "local":
        return info.steps("train", settings.batch_size, fmt=settings.format)
    if settings.engine == "elephas":
        records = [info.worker_records("train", w, settings.workers, settings.format)
                   for w in range(settings.workers)]
        if min(records) < 1:
            raise ValueError(f"workers: {settings.workers} workers leave worker "
                             f"{records.index(min(records))} without training records")
        return max(math.ceil(r / settings.batch_size) for r in records)
    return None


def _check_rewinds(settings: DenseSettings, spe: int) -> dict[str, int]:
    rewinds = rewind_steps(settings.rewind, spe, spe * settings.epochs)
    if settings.engine == "elephas" and settings.averaging == "epoch":
        off = [label for label, step in rewinds.items() if step % spe]
        if off:
            raise ValueError(f"rewind: {', '.join(off)}: inside an epoch, but the elephas engine "
                             f"with averaging=epoch only has weights at epoch ends ({spe} steps); "
                             f"set averaging to a number of steps K")
    return rewinds


class ElephasEngine:
    """Driver side of the elephas engine: rounds of `train.elephas_engine.SparkDataParallel`.

    averaging=epoch: one round is one pass of every worker over its shards. averaging=K: rounds
    of K steps on each worker's endless stream, also cut at epoch ends and rewind points so the
    driver holds the averaged weights exactly there. The driver keeps a compiled model with the
    averaged weights and optimizer state for evaluation, checkpoints and resume.
    """

    def __init__(self, settings: DenseSettings, info: DatasetInfo, spark=None):
        from train.data import make_dataset
        from train.elephas_engine import SparkDataParallel
        from train.local_engine import compile_kwargs, model_builder, optimizer_builder

        self.settings, self.info, self.is_chief = settings, info, True
        self.steps_per_epoch = steps_per_epoch(settings, info)
        if spark is None:
            from common.spark import get_spark

            spark = get_spark("bigticket-train", settings.master)
        files = [str(f.path) for f in info.shard_files("train", settings.format)]
        by_file = len(files) >= settings.workers  # same rule as train.data.make_dataset
        s = settings
        kwargs = dict(batch_size=s.batch_size, training=True, input_size=s.input_size,
                      fmt=s.format, cache=s.cache, augment=s.augment,
                      shuffle_buffer=s.shuffle_buffer)

        self.averaging = None if s.averaging == "epoch" else int(s.averaging)
        # K-step rounds read an endless stream: make it reshuffle on each pass over the shards.
        kwargs["repeat"] = self.averaging is not None

        def dataset_factory(shard_files, worker_index, num_workers, seed):
            if shard_files:  # this worker's own files
                return make_dataset(info, "train", shard_files=shard_files, seed=seed, **kwargs)
            return make_dataset(info, "train", worker_index=worker_index,
                                num_workers=num_workers, seed=seed, **kwargs)

        model_factory, optimizer_factory = model_builder(s, info.num_classes), optimizer_builder(s)
        # GPUs per task as Spark schedules them (spark.task.resource.gpu.amount, e.g. from
        # spark-submit --conf); 0 on CPU-only clusters, where tasks leave devices alone.
        amount = spark.sparkContext.getConf().get("spark.task.resource.gpu.amount", "0")
        gpus_per_task = max(0, math.ceil(float(amount)))  # a shared GPU (0.25) still needs pinning
        self.dp = SparkDataParallel(spark, model_factory, optimizer_factory, compile_kwargs(),
                                    dataset_factory, s.workers, averaging_steps=self.averaging,
                                    gpus_per_task=gpus_per_task, shards=files if by_file else None)
        self.model = model_factory()
        self.model.compile(optimizer=optimizer_factory(), **compile_kwargs())
        self.model.optimizer.build(self.model.trainable_variables)
        self._io = None   # train.spark_worker.StateIO of self.model, made on the first round
        log.info("engine elephas: %d workers, %s shards, %d steps per epoch, averaging %s",
                 s.workers, "by file" if by_file else "by record", self.steps_per_epoch,
                 s.averaging)

    def _round(self, lr: float, steps: int | None, round_index: int, start_step: int | None):
        from train.spark_worker import StateIO

        # One traced read and one traced assign for all ~400 variables instead of one eager op
        # each (the driver's share of a round's fixed cost); made on first use, after any resume
        # has loaded into the same variables.
        if self._io is None:
            self._io = StateIO(self.model)
        io = self._io
        state = io.read()
        result = self.dp.run_round(state[:io.n_weights], state[io.n_weights:], lr=lr, steps=steps,
                                   round_index=round_index, seed=self.settings.seed,
                                   start_step=start_step)
        io.load(result.weights, result.optimizer_state)
        return result

    def train_epoch(self, epoch: int, lr: float, stops: Sequence[int] = (),
                    at_stop: Callable[[int], None] | None = None) -> dict[str, float]:
        spe = self.steps_per_epoch
        t0 = time.perf_counter()
        results = []
        if self.averaging is None:
            results.append(self._round(lr, None, epoch, None))
            if at_stop is not None and (epoch + 1) * spe in stops:
                at_stop((epoch + 1) * spe)
        else:
            step, end = epoch * spe, (epoch + 1) * spe
            while step < end:
                k = self.averaging
                cut = min([end, (step // k + 1) * k] + [s for s in stops if s > step])
                results.append(self._round(lr, cut - step, step // k, step))
                step = cut
                if at_stop is not None and step in stops:
                    at_stop(step)
        records = sum(r.records for r in results)
        metrics = {name: sum(r.metrics[name] * r.records for r in results) / records
                   for name in ("loss", "accuracy") if all(name in r.metrics for r in results)}
        elapsed = time.perf_counter() - t0
        metrics["images_per_s"] = records / elapsed if elapsed > 0 else 0.0
        metrics["round_fixed_cost_s"] = sum(r.metrics["fixed_cost_s"] for r in results) / len(results)
        return metrics

    def evaluate(self) -> dict[str, float]:
        from train.local_engine import evaluate_model

        return evaluate_model(self.model, self.settings, self.info)

    def close(self) -> None:
        self.dp.close()


def _make_engine(settings: DenseSettings, info: DatasetInfo, spark=None):
    if settings.engine in ("local", "multiworker"):
        from train.local_engine import LocalEngine

        return LocalEngine(settings, info, multiworker=settings.engine == "multiworker")
    return ElephasEngine(settings, info, spark=spark)


def _early_stop(settings: DenseSettings, history: list[dict]) -> bool:
    """Stop when the monitored validation metric has not improved for `patience` epochs."""
    patience = settings.early_stopping_patience
    metric = settings.early_stopping_metric
    if not patience or len(history) <= patience:
        return False
    values = [row[metric] for row in history]
    sign = -1.0 if metric == "val_loss" else 1.0
    best_index = max(range(len(values)), key=lambda i: (sign * values[i], -i))
    return len(values) - 1 - best_index >= patience


@dataclasses.dataclass(frozen=True)
class PreparedRun:
    settings: DenseSettings        # resolved against the dataset
    info: DatasetInfo
    run: DenseRunPaths
    steps_per_epoch: int | None    # None for multiworker until its cluster is up
    rewinds: dict[str, int]        # label -> global step (empty until steps are known)


def prepare_run(settings: DenseSettings) -> PreparedRun:
    """Every check that needs no training: dataset, settings against it, rewind points against
    the steps per epoch; names the run directory. ValueError names the setting or file."""
    info = open_dataset(settings.data)
    settings = resolve_settings(settings, info)
    spe = steps_per_epoch(settings, info)
    rewinds = _check_rewinds(settings, spe) if spe is not None else {}
    return PreparedRun(settings, info, DenseRunPaths.under(settings.out, run_hash(settings, info)),
                       spe, rewinds)


def train_dense(settings: DenseSettings, *, spark=None) -> DenseRunPaths:
    """Train (or finish, or skip) the dense run of `settings`; returns its directory.

    Everything that can be checked is checked before the first step (see prepare_run). `spark`
    is an existing SparkSession for the elephas engine (default: common.spark.get_spark with
    settings.master).
    """
    from train.local_engine import configure_tensorflow

    prepared = prepare_run(settings)
    run = prepared.run
    if run.success.is_file():
        log.info("run %s is complete; not retraining", run.root)
        return run
    configure_tensorflow(prepared.settings)
    engine = _make_engine(prepared.settings, prepared.info, spark=spark)
    try:
        _drive(prepared.settings, prepared.info, run, engine)
    finally:
        engine.close()
    return run


def _drive(settings: DenseSettings, info: DatasetInfo, run: DenseRunPaths, engine) -> None:
    import tensorflow as tf

    spe = engine.steps_per_epoch
    rewinds = _check_rewinds(settings, spe)
    chief = engine.is_chief
    if chief:
        run.root.mkdir(parents=True, exist_ok=True)
        _write_settings(run, _settings_record(settings, info, spe, rewinds))
    model = engine.model
    resume = _Resume(run)
    epochs_done, weights = resume.load()
    history = read_history(run)[:epochs_done]
    if weights is not None:
        model.load_weights(str(weights))  # weights and optimizer state (momentum, iterations)
        log.info("resuming %s after epoch %d", run.root, epochs_done)
    elif chief:
        save_checkpoint(model, run, "init")
        for label, step in rewinds.items():
            if step == 0:
                save_checkpoint(model, run, label)

    def at_stop(step: int) -> None:
        if chief:
            for label, at in rewinds.items():
                if at == step:
                    save_checkpoint(engine.model, run, label)

    tracker = None
    if settings.early_bird:
        # lottery -> train is the usual direction; this lazy import is the one seam back: the
        # detector lives with the other pruning maths, the driver only calls it per epoch.
        from train.early_bird import EarlyBirdTracker

        tracker = EarlyBirdTracker(run, model, ratio=settings.early_bird_ratio,
                                   window=settings.early_bird_window,
                                   threshold=settings.early_bird_threshold,
                                   stop_at_early_bird=settings.stop_at_early_bird,
                                   epochs=settings.epochs, chief=chief)
        tracker.resume(epochs_done)

    writer = tf.summary.create_file_writer(str(run.tensorboard)) if chief else None
    stopped = _early_stop(settings, history) or (tracker is not None and tracker.stop)
    from tqdm import tqdm

    epochs = tqdm(range(epochs_done, settings.epochs), initial=epochs_done, total=settings.epochs,
                  desc=f"dense {run.root.name}", unit="epoch", disable=not chief or stopped)
    for epoch in epochs:
        if stopped:
            break
        lr = lr_at(settings, epoch)
        stops = sorted({s for s in rewinds.values() if epoch * spe < s <= (epoch + 1) * spe})
        t0 = time.perf_counter()
        metrics = engine.train_epoch(epoch, lr, stops, at_stop)
        metrics.update(engine.evaluate())
        row = {"epoch": epoch + 1, **metrics, "lr": lr, "time_s": time.perf_counter() - t0}
        history.append(row)
        log.info("epoch %d/%d: loss %.4f acc %.4f val_loss %.4f val_acc %.4f lr %.5g (%.1fs)",
                 epoch + 1, settings.epochs, row.get("loss", float("nan")),
                 row.get("accuracy", float("nan")), row.get("val_loss", float("nan")),
                 row.get("val_accuracy", float("nan")), lr, row["time_s"])
        # Early-Bird files before the resume state names this epoch: a run killed in between
        # retrains the epoch and rewrites them (tracker.resume keeps epochs <= the state's).
        bird_stop = tracker is not None and tracker.after_epoch(epoch + 1)
        if chief:
            with writer.as_default(step=epoch + 1):
                for key in HISTORY_COLUMNS[1:]:
                    if key in row:
                        tf.summary.scalar(key, row[key])
            writer.flush()
            resume.save(model, epoch + 1, history)
        stopped = _early_stop(settings, history)
        if stopped:
            log.info("early stopping after epoch %d: %s has not improved for %d epochs",
                     epoch + 1, settings.early_stopping_metric, settings.early_stopping_patience)
        elif bird_stop:
            stopped = True
            log.info("stopping after epoch %d of %d: the Early-Bird ticket is drawn "
                     "(stop_at_early_bird)", epoch + 1, settings.epochs)
    if not chief:
        return
    done_steps = len(history) * spe
    missing = [label for label, step in rewinds.items() if step > done_steps]
    if missing:
        log.warning("stopped early at step %d: no checkpoint for rewind point(s) %s",
                    done_steps, ", ".join(missing))
    save_checkpoint(model, run, "final")
    _save_model_atomic(model, run.model)
    write_text(run.history, _history_text(history))
    if writer is not None:
        writer.close()
    run.success.write_bytes(b"")
    shutil.rmtree(run.resume, ignore_errors=True)  # only needed until the run is complete
    log.info("dense run complete: %s", run.root)
