"""`train_dense`: the driver loop that writes a dense run directory.

The driver owns the epoch loop for every engine (`train.engines`): the learning rate, evaluation,
the history, the init and final checkpoints and resume. Everything else that happens per epoch
is a hook (`train.hooks`), registered here from the settings: rewind checkpoints, the Early-Bird
detector, TensorBoard scalars, early stopping.

The run directory: settings.json, history.csv, resume/, model.keras (`train.run_files`),
checkpoints/ (`train.checkpoints`), tensorboard/, early_bird.json and early_bird_masks.npz
(`train.early_bird`), and _SUCCESS, written last.

Resume: a re-run loads the last complete epoch k (`train.run_files.ResumeState`) and continues
with epoch k+1; hooks rebuild their own state from their files. Since the data order and
augmentation derive from (seed, epoch), the final weights equal an uninterrupted run's. Files are
written inside `train.interrupts.shielded` blocks, so a SIGTERM stops the run between writes.

A shard damaged after the ETL job (same size, other bytes) fails the epoch that reads it with
`train.damaged_shards.CorruptShardError` naming the shard, instead of TensorFlow's read error.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import time
from typing import Iterator, Sequence

from tqdm import tqdm

from common.paths import DenseRunPaths
from common.settings import identity_hash
from train.bn_recalibration import EpochEvaluator
from train.chance_check import dense_chance_check
from train.checkpoints import rewind_steps, save_checkpoint
from train.damaged_shards import raise_if_damaged
from train.data import DatasetError, DatasetInfo, open_dataset
from train.early_bird import EarlyBirdTracker
from train.engines import Engine, make_engine, steps_per_epoch
from train.gmp import GradualPruning
from train.gmp_schedule import schedule_from_settings
from train.hooks import EarlyStopping, EpochHook, LoopState, RewindCheckpoints, TensorBoardScalars
from train.interrupts import reclaim_signals, shielded
from train.local_engine import bind_devices, configure_tensorflow
from train.masked_optimizer import as_plain_optimizer
from train.models import resolve_bn_momentum
from train.run_files import ResumeState, read_history, save_model_atomic, settings_record, write_history, write_settings
from train.schedules import lr_at
from train.settings import LATER_FIELD_DEFAULTS, NON_IDENTITY_FIELDS, DenseSettings

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# preparation: every check that needs no training

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
    return identity_hash(settings, neutral=NON_IDENTITY_FIELDS, omit_defaults=LATER_FIELD_DEFAULTS,
                         extra={"manifest_sha256": info.manifest_sha256})


def check_rewinds(settings: DenseSettings, spe: int) -> dict[str, int]:
    """label -> global step of every rewind point; ValueError when the engine cannot stop there."""
    rewinds = rewind_steps(settings.rewind, spe, spe * settings.epochs)
    if settings.engine == "elephas" and settings.averaging == "epoch":
        off = [label for label, step in rewinds.items() if step % spe]
        if off:
            raise ValueError(f"rewind: {', '.join(off)}: inside an epoch, but the elephas engine "
                             f"with averaging=epoch only has weights at epoch ends ({spe} steps); "
                             f"set averaging to a number of steps K")
    check_gmp_steps(settings, spe)
    return rewinds


def check_gmp_steps(settings: DenseSettings, spe: int) -> None:
    """ValueError naming the GMP field when the schedule does not fit the run or the engine."""
    schedule = schedule_from_settings(settings, spe * settings.epochs)  # end past the last step
    if schedule is None or settings.engine != "elephas" or settings.averaging != "epoch":
        return
    off = [step for step in schedule.update_steps() if step % spe]
    if off:
        raise ValueError(f"gmp_frequency: mask updates at steps {off[:3]} fall inside an epoch, "
                         f"but the elephas engine with averaging=epoch only has weights at epoch "
                         f"ends ({spe} steps); set averaging to a number of steps K, or make "
                         f"gmp_begin_step, gmp_frequency and gmp_end_step multiples of {spe}")


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
    try:
        info = open_dataset(settings.data)
    except DatasetError as err:
        raise DatasetError(f"data: {err}") from None
    settings = resolve_settings(settings, info)
    spe = steps_per_epoch(settings, info)
    # BatchNorm momentum fitted to the epoch's length when not set (train.models); multiworker
    # steps are known later: the single-process count stands in (the same on every worker).
    options, _ = resolve_bn_momentum(settings.model, settings.model_options, spe or info.steps(
        "train", settings.batch_size, fmt=settings.format))
    if options != settings.model_options:
        settings = dataclasses.replace(settings, model_options=options)
    rewinds = check_rewinds(settings, spe) if spe is not None else {}
    return PreparedRun(settings, info, DenseRunPaths.under(settings.out, run_hash(settings, info)),
                       spe, rewinds)


# ---------------------------------------------------------------------------------------------
# training

def train_dense(settings: DenseSettings, *, spark=None,
                hooks: Sequence[EpochHook] = ()) -> DenseRunPaths:
    """Train (or finish, or skip) the dense run of `settings`; returns its directory.

    Everything that can be checked is checked before the first step (see prepare_run). `spark`
    is an existing SparkSession for the elephas engine (default: common.spark.get_spark with
    settings.master). `hooks` run after those the settings ask for; the run directory is named by
    the settings alone, so a hook must not change what the run trains.
    """
    prepared = prepare_run(settings)
    run = prepared.run
    if run.success.is_file():
        log.info("run %s is complete; not retraining", run.root)
        return run
    bind_devices(prepared.settings.engine)  # before TensorFlow starts
    configure_tensorflow(prepared.settings, trains=prepared.settings.engine != "elephas")
    engine = make_engine(prepared.settings, prepared.info, spark=spark)
    reclaim_signals()  # a SparkContext just started takes SIGINT for itself
    try:
        _drive(prepared.settings, prepared.info, run, engine, extra_hooks=hooks)
    finally:
        engine.close()
    return run


def epoch_hooks(settings: DenseSettings, run: DenseRunPaths, model, chief: bool,
                rewinds: dict[str, int], steps_per_epoch: int | None = None) -> list[EpochHook]:
    """The hooks `settings` ask for, in the order they are called. Every process gets those that
    decide when to stop (multiworker workers must stop together); the chief also those that write.
    Gradual pruning comes first (every process), so that a checkpoint taken at the step of a mask
    update holds the pruned weights."""
    hooks: list[EpochHook] = []
    if settings.gmp_schedule != "none":
        hooks.append(GradualPruning(settings, run, model, chief, steps_per_epoch))
    if chief:
        hooks.append(RewindCheckpoints(rewinds))
    if settings.early_bird:
        hooks.append(EarlyBirdTracker(run, model, ratio=settings.early_bird_ratio,
                                      window=settings.early_bird_window,
                                      threshold=settings.early_bird_threshold,
                                      stop_at_early_bird=settings.stop_at_early_bird,
                                      epochs=settings.epochs, chief=chief))
    if chief:
        hooks.append(TensorBoardScalars())
    if settings.early_stopping_patience:
        hooks.append(EarlyStopping(settings))
    return hooks


def _drive(settings: DenseSettings, info: DatasetInfo, run: DenseRunPaths, engine: Engine,
           extra_hooks: Sequence[EpochHook] = ()) -> None:
    rewinds = check_rewinds(settings, engine.steps_per_epoch)  # multiworker: known only now
    # Hooks first: their checks (gmp_exclude against the model) come before any file is written.
    evaluator = EpochEvaluator(settings, info, engine)  # BatchNorm recalibration, if due
    hooks = epoch_hooks(settings, run, engine.model, engine.is_chief, rewinds,
                        engine.steps_per_epoch) + [
        dense_chance_check(settings, info, engine.steps_per_epoch, evaluator.enabled)
    ] + list(extra_hooks)
    state = _start(settings, info, run, engine, rewinds)
    with shielded():
        stopped = any([hook.on_train_begin(state) for hook in hooks])  # every hook, no short cut
    if not stopped:
        _train_epochs(engine, hooks, state, info, evaluator.evaluate)
    with shielded():
        for hook in hooks:
            hook.on_train_end(state)
        if state.chief:
            _finish(state)


def _start(settings: DenseSettings, info: DatasetInfo, run: DenseRunPaths, engine: Engine,
           rewinds: dict[str, int]) -> LoopState:
    """settings.json written (or checked), then the last complete epoch loaded or "init" saved."""
    chief, model = engine.is_chief, engine.model
    with shielded():
        if chief:
            run.root.mkdir(parents=True, exist_ok=True)
            write_settings(run, {**settings_record(settings, info, engine.steps_per_epoch, rewinds),
                                 "bn_momentum": resolve_bn_momentum(
                                     settings.model, settings.model_options, None)[1]})
        epochs_done, weights = ResumeState(run).load()
        history = read_history(run)[:epochs_done]
        if weights is not None:
            model.load_weights(str(weights))  # weights and optimizer state (momentum, iterations)
            log.info("resuming %s after epoch %d", run.root, epochs_done)
        elif chief:
            save_checkpoint(model, run, "init")
    return LoopState(settings, run, model, chief, engine.steps_per_epoch, epochs_done, history)


@contextlib.contextmanager
def _reading(info: DatasetInfo, settings: DenseSettings, split: str) -> Iterator[None]:
    """A read error from a shard damaged since the ETL job becomes CorruptShardError naming it."""
    try:
        yield
    except Exception as err:
        raise_if_damaged(info, split, settings.format, err)
        raise


def _train_epochs(engine: Engine, hooks: list[EpochHook], state: LoopState,
                  info: DatasetInfo, evaluate=None) -> None:
    """Epochs from the first incomplete one until the last, or until a hook asks to stop."""
    settings, spe = state.settings, state.steps_per_epoch
    resume = ResumeState(state.run)

    def at_stop(step: int) -> None:
        with shielded():
            for hook in hooks:
                if step in hook.pause_steps:
                    hook.on_step(step, state)

    with tqdm(total=settings.epochs, initial=state.epochs_done, unit="epoch",
              desc=f"dense {state.run.root.name}", disable=not state.chief) as bar:
        for epoch in range(state.epochs_done, settings.epochs):
            lr = lr_at(settings, epoch)
            stops = sorted({s for hook in hooks for s in hook.pause_steps
                            if epoch * spe < s <= (epoch + 1) * spe})
            t0 = time.perf_counter()
            with _reading(info, settings, "train"):
                metrics = engine.train_epoch(epoch, lr, stops, at_stop)
            with _reading(info, settings, "validation"):
                metrics.update(evaluate(epoch) if evaluate is not None else engine.evaluate())
            row = {"epoch": epoch + 1, **metrics, "lr": lr, "time_s": time.perf_counter() - t0}
            log.info("epoch %d/%d: loss %.4f acc %.4f val_loss %.4f val_acc %.4f lr %.5g (%.1fs)",
                     epoch + 1, settings.epochs, row.get("loss", float("nan")),
                     row.get("accuracy", float("nan")), row.get("val_loss", float("nan")),
                     row.get("val_accuracy", float("nan")), lr, row["time_s"])
            with shielded():
                state.history.append(row)
                stop = any([hook.on_epoch_end(epoch + 1, row, state) for hook in hooks])
                if state.chief:
                    resume.save(state.model, epoch + 1, state.history)
                state.epochs_done = epoch + 1
            bar.update(1)
            if stop:
                break


def _finish(state: LoopState) -> None:
    """The final checkpoint and model, the full history, then _SUCCESS; resume/ goes."""
    run = state.run
    save_checkpoint(state.model, run, "final")
    with as_plain_optimizer(state.model.optimizer):  # GMP: model.keras names Keras classes only
        save_model_atomic(state.model, run.model)
    write_history(run, state.history)
    run.success.write_bytes(b"")
    shutil.rmtree(run.resume, ignore_errors=True)  # only needed until the run is complete
    log.info("dense run complete: %s", run.root)
