"""`bigticket train dense ...`: train a dense network and print the run directory it wrote.

The flags are DenseSettings' fields (common.cli). Settings come from `--preset NAME`
(common.presets), then `--config FILE` (JSON/YAML with DenseSettings' field names), then the flags,
each overriding the last. Every check (settings, dataset, rewind points) runs before any training;
a failure prints one line naming the flag, setting or file and exits with status 2. A shard found
damaged while training reads it is named in one line (status 1). SIGTERM or SIGINT stops the run
between file writes with one line saying where a re-run resumes, and status 128 + the signal.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time

from common.cli import SettingsFlags, report_error, usage_error
from common.paths import DenseRunPaths
from train.damaged_shards import CorruptShardError
from train.driver_memory import DriverMemoryError
from train.interrupts import Interrupted, held_signal, interrupts_raise
from train.run import prepare_run, train_dense
from train.run_files import ResumeState
from train.settings import DenseSettings

log = logging.getLogger(__name__)

FLAGS = SettingsFlags(DenseSettings, preset_stage="dense", groups={
    "network slimming and Early-Bird tickets": (
        "bn_l1", "early_bird", "early_bird_ratio", "early_bird_window", "early_bird_threshold",
        "stop_at_early_bird"),
    "gradual magnitude pruning (train.gmp)": (
        "gmp_schedule", "gmp_initial_sparsity", "gmp_final_sparsity", "gmp_begin_step",
        "gmp_end_step", "gmp_power", "gmp_frequency", "gmp_scope", "gmp_exclude",
        "gmp_prune_depthwise"),
})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="train_command", required=True, metavar="COMMAND")
    dense = sub.add_parser("dense", help="train a dense network; prints the run directory",
                           description=__doc__.splitlines()[0])
    dense.add_argument("--preset", metavar="NAME", help="start from a named preset of "
                       "common.presets, e.g. early-bird-resnet20 (--config and flags override it)")
    dense.add_argument("--config", metavar="FILE",
                       help="JSON/YAML file of settings (flags override it)")
    FLAGS.add_arguments(dense)
    dense.set_defaults(_train_run=_run_dense)


def settings_from_args(args: argparse.Namespace) -> DenseSettings:
    return FLAGS.resolve(args)


def _run_dense(args: argparse.Namespace) -> int:
    run_dir = None
    with interrupts_raise(on_hold=[_cancel_spark_jobs]):
        try:
            try:
                settings = settings_from_args(args)
                run_dir = prepare_run(settings).run  # every check before TensorFlow or Spark
            except (ValueError, OSError) as err:
                return usage_error(args, err)
            run = train_dense(settings)
        except DriverMemoryError as err:  # refused before round 0: a setting to change
            return usage_error(args, err)
        except CorruptShardError as err:
            return report_error(args, err)
        except Interrupted as stop:
            return _interrupted(stop.signum, run_dir)
        except KeyboardInterrupt:  # SIGINT taken by a library's handler before ours was back
            return _interrupted(signal.SIGINT, run_dir)
        except Exception:
            if held_signal() is None:
                raise
            return _interrupted(held_signal(), run_dir)  # the Spark round failed: we cancelled it
    print(run.root)
    return 0


def _interrupted(signum: int, run_dir: DenseRunPaths | None) -> int:
    _stop_spark_quietly()
    log.warning("%s", _where_to_resume(run_dir))
    return Interrupted(signum).exit_status


def _where_to_resume(run: DenseRunPaths | None) -> str:
    if run is not None and run.success.is_file():   # the signal waited for the last write
        return f"interrupted after the run completed: {run.root}"
    epochs = 0
    if run is not None:
        try:
            epochs = ResumeState(run).load()[0]
        except (OSError, ValueError):
            pass
    where = f"after epoch {epochs}" if epochs else "before the first epoch completed"
    return f"interrupted {where}; re-run the same command to resume"


def _active_spark_context():
    if "pyspark" not in sys.modules:
        return None
    from pyspark import SparkContext

    return SparkContext._active_spark_context


_SPARK_STOPPING = threading.Event()   # _stop_spark_quietly began: cancelling is over


def _cancel_spark_jobs() -> None:
    """From a thread, while the main thread waits on a Spark job: silence Spark and cancel the
    job (and any that starts before the main thread stops), so the wait ends at once."""
    sc = _active_spark_context()
    if sc is None:
        return
    logging.getLogger("py4j").setLevel(logging.CRITICAL)
    try:
        sc.setLogLevel("OFF")
        while not _SPARK_STOPPING.is_set():
            sc.cancelAllJobs()
            _SPARK_STOPPING.wait(0.5)
    except Exception:  # the context is stopping: nothing left to cancel
        log.debug("cancelling Spark jobs", exc_info=True)


def _spark_idle(sc) -> bool:
    if sc.statusTracker().getActiveJobsIds():
        return False
    infos = sc._jsc.sc().statusTracker().getExecutorInfos()
    return all(info.numRunningTasks() == 0 for info in infos)


def _stop_spark_quietly(wait: float = 30.0) -> None:
    """End a SparkSession this process started (the elephas engine) without the JVM's and
    py4j's shutdown noise: logging off, running jobs cancelled and their tasks gone (a job still
    completing when the context stops makes the JVM print RejectedExecutionException), then
    stopped."""
    _SPARK_STOPPING.set()
    sc = _active_spark_context()
    if sc is None:
        return
    logging.getLogger("py4j").setLevel(logging.CRITICAL)
    try:
        sc.setLogLevel("OFF")
        sc.cancelAllJobs()
        deadline = time.monotonic() + wait
        while not _spark_idle(sc) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)   # the cancelled job's completion callbacks
        sc.stop()
    except Exception:  # the JVM may be going already; a stop must not end in a traceback
        log.debug("stopping Spark", exc_info=True)


def run(args: argparse.Namespace) -> int:
    return args._train_run(args)
