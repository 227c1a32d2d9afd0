"""ETL at ImageNet's size of listing: `bigticket etl prepare --source imagenet-folder` on a real
folder tree of 1,281,167 training names in 1000 synset folders plus a flat 50,000-image
validation folder and its ground-truth file, into 1024 + 128 shards; and the same at smaller
fractions of that listing, so the growth of each cost is visible.

The tree is hard links to a few dozen real 80x60 JPEGs (etl.samples.build_imagenet_tree): every
name is a real file the job lists, stats, reads, decodes, resizes and writes, but the disk holds
one inode per photo. Building 1.33 million links takes minutes, so each fraction's tree is kept
under --tree-dir and reused by later runs.

Measured per fraction, from outside the job (it runs as the CLI in a child process):
  driver memory   peak resident set (VmHWM) of the Python driver and of the driver JVM it starts
                  (polled from /proc; VmHWM is the kernel's own high-water mark)
  enumerate       the Spark job that lists, keys, shuffles and counts every input
  write           the Spark job that reads, decodes, resizes and writes the shards
  driver-only     everything else: listing the units, reconciling sidecars, the manifest
  CPU             seconds of the driver, its JVM and the Python workers (from /proc, polled):
                  on a shared machine the figure to compare, wall time measures the neighbours
  images/s        written images per second of the write job, and of the whole run
  manifest        bytes of manifest.json (and quarantine.jsonl)
Job times come from Spark's event log (job descriptions set by etl.job). Counts are checked:
inputs = written for each split, equal to the tree's. The machine may be shared: wall times then
measure the neighbours too; memory does not.

Usage: python bench/etl_scale.py [--fractions 0.1,0.3333,1] [--tree-dir DIR] [--master local[2]]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from common.atomic import read_json, write_json  # noqa: E402
from common.logs import setup_logging  # noqa: E402
from etl.job import ENUMERATE_PHASE, WRITE_PHASE  # noqa: E402
from etl.samples import build_imagenet_tree, imagenet_tree_counts  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "etl_scale.json"
DEFAULT_TREE_DIR = Path(tempfile.gettempdir()) / "bigticket-etl-scale"
DRIVER_TARGET_BYTES = 2 * 1024 ** 3


def ensure_tree(tree_dir: Path, fraction: float) -> dict:
    """The tree of this fraction under tree_dir, built once (marked complete) and reused."""
    per_class, validation = imagenet_tree_counts(fraction)
    name = f"imagenet-{sum(per_class)}"
    marker = tree_dir / f"{name}.complete.json"
    if marker.exists():
        return read_json(marker)
    root = tree_dir / name
    for stale in (root, tree_dir / f"{name}.pool"):  # an interrupted build: start again
        shutil.rmtree(stale, ignore_errors=True)
    started = time.perf_counter()
    built = build_imagenet_tree(root, per_class, validation)
    built["build_s"] = round(time.perf_counter() - started, 1)
    write_json(marker, built)
    return built


def _status_kb(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _cpu_ticks(pid: int) -> int:
    """utime + stime of one process so far (its own threads, not its children)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def run_prepare(tree: dict, out: Path, args, events: Path) -> dict:
    """The CLI in a child process, its driver memory polled; returns the measurements."""
    events.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # Spark's own event log gives each job's start and end (PySpark reads these at launch).
    env["PYSPARK_SUBMIT_ARGS"] = " ".join(
        f"--conf {key}={value}" for key, value in {
            "spark.eventLog.enabled": "true", "spark.eventLog.dir": f"file://{events}",
            "spark.eventLog.rolling.enabled": "false", "spark.eventLog.compress": "false",
        }.items()) + " pyspark-shell"
    command = [sys.executable, "-m", "bigticket", "etl", "prepare", "--source", "imagenet-folder",
               "--input", tree["root"], "--val-ground-truth", tree["ground_truth"],
               "--out", str(out), "--resize", args.resize, "--format", args.format,
               "--shards", str(args.shards), "--validation-shards", str(args.validation_shards),
               "--master", args.master]
    log_path = out.parent / f"{out.name}.log"
    started = time.perf_counter()
    with open(log_path, "wb") as log_file:
        child = subprocess.Popen(command, cwd=REPO, env=env, stdout=log_file, stderr=log_file)
        peaks = {"python": 0, "jvm": 0}
        # CPU per process, last seen: a Python worker that exits loses at most one poll's worth.
        ticks: dict[int, tuple[str, int]] = {}
        while child.poll() is None:
            python_hwm = _status_kb(child.pid, "VmHWM")
            if python_hwm:
                peaks["python"] = max(peaks["python"], python_hwm)
            ticks[child.pid] = ("driver", _cpu_ticks(child.pid) or ticks.get(child.pid, ("", 0))[1])
            for pid in _descendants(child.pid):
                role = "jvm" if _comm(pid) == "java" else "workers"
                if role == "jvm":
                    peaks["jvm"] = max(peaks["jvm"], _status_kb(pid, "VmHWM") or 0)
                ticks[pid] = (role, max(_cpu_ticks(pid), ticks.get(pid, ("", 0))[1]))
            time.sleep(args.poll)
    wall = time.perf_counter() - started
    if child.returncode != 0:
        raise RuntimeError(f"bigticket etl prepare failed ({child.returncode}); see {log_path}")
    jobs = job_times(events)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    splits = manifest["splits"]
    expected = {"train": tree["train"], "validation": tree["validation"]}
    for split, count in expected.items():
        info = splits[split]
        if not info["inputs"] == info["records"] == count or info["quarantined"]:
            raise RuntimeError(f"{split}: expected {count} inputs = written, got {info}")
    written = sum(s["records"] for s in splits.values())
    hz = os.sysconf("SC_CLK_TCK")
    cpu = {role: round(sum(t for r, t in ticks.values() if r == role) / hz, 1)
           for role in ("driver", "jvm", "workers")}
    enumerate_s, write_s = jobs.get(ENUMERATE_PHASE), jobs.get(WRITE_PHASE)
    return {
        "images": written, "wall_s": round(wall, 1),
        "cpu_s": round(sum(cpu.values()), 1), "cpu_driver_s": cpu["driver"],
        "cpu_jvm_s": cpu["jvm"], "cpu_workers_s": cpu["workers"],
        "driver_python_peak_mb": round(peaks["python"] / 1024, 1),
        "driver_jvm_peak_mb": round(peaks["jvm"] / 1024, 1),
        "enumerate_s": enumerate_s and round(enumerate_s, 1),
        "write_s": write_s and round(write_s, 1),
        "driver_only_s": round(wall - (enumerate_s or 0) - (write_s or 0), 1),
        "images_per_s_write": write_s and round(written / write_s, 1),
        "images_per_s_overall": round(written / wall, 1),
        "manifest_bytes": manifest_path.stat().st_size,
        "quarantine_bytes": (out / "quarantine.jsonl").stat().st_size,
        "shard_files": sum(len(s["shards"]) for s in splits.values()),
        "log": str(log_path),
    }


def job_times(events: Path) -> dict[str, float]:
    """Seconds per job description, summed, from the Spark event log(s) in `events`."""
    starts: dict[int, tuple[str, int]] = {}
    totals: dict[str, float] = {}
    for path in sorted(p for p in events.rglob("*") if p.is_file()):
        with open(path) as fh:
            for line in fh:
                if '"SparkListenerJob' not in line[:40]:
                    continue
                event = json.loads(line)
                if event["Event"] == "SparkListenerJobStart":
                    description = (event.get("Properties") or {}).get("spark.job.description", "")
                    starts[event["Job ID"]] = (description, event["Submission Time"])
                elif event["Event"] == "SparkListenerJobEnd" and event["Job ID"] in starts:
                    description, start = starts.pop(event["Job ID"])
                    totals[description] = totals.get(description, 0.0) + (
                        event["Completion Time"] - start) / 1000
    return totals


def growth_table(rows: list[dict]) -> str:
    cols = [("images", "images", 9), ("wall_s", "wall s", 7), ("cpu_s", "CPU s", 7),
            ("driver_python_peak_mb", "py drv MB", 9), ("driver_jvm_peak_mb", "JVM drv MB", 10),
            ("enumerate_s", "enum s", 7), ("write_s", "write s", 7),
            ("driver_only_s", "drv-only s", 10), ("images_per_s_write", "img/s write", 11),
            ("images_per_s_overall", "img/s all", 9), ("manifest_bytes", "manifest B", 10)]
    lines = [" ".join(f"{title:>{w}}" for _, title, w in cols)]
    for row in rows:
        lines.append(" ".join(f"{'' if row.get(k) is None else row[k]!s:>{w}}" for k, _, w in cols))
    if len(rows) > 1:
        base = rows[0]
        lines.append("growth vs the smallest run (x):")
        for row in rows[1:]:
            lines.append(" ".join(
                f"{'' if not base.get(k) or row.get(k) is None else f'{row[k] / base[k]:.2f}':>{w}}"
                for k, _, w in cols))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", default="0.1,0.3333,1",
                        help="fractions of ImageNet's listing, smallest first (default 0.1,0.3333,1)")
    parser.add_argument("--tree-dir", type=Path, default=DEFAULT_TREE_DIR,
                        help=f"where the trees are built once and kept (default {DEFAULT_TREE_DIR})")
    parser.add_argument("--work", type=Path, default=None,
                        help="where datasets are written (default: a temporary folder, removed)")
    parser.add_argument("--master", default="local[2]", help="Spark master (default local[2])")
    parser.add_argument("--shards", type=int, default=1024, help="train shards (default 1024)")
    parser.add_argument("--validation-shards", type=int, default=128,
                        help="validation shards (default 128)")
    parser.add_argument("--resize", default="fixed:32", help="resize policy (default fixed:32)")
    parser.add_argument("--format", default="tfrecord", help="shard formats (default tfrecord)")
    parser.add_argument("--poll", type=float, default=0.25, help="memory poll interval, seconds")
    parser.add_argument("--keep-output", action="store_true", help="keep the written datasets")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = parser.parse_args(argv)
    fractions = [float(f) for f in args.fractions.split(",")]
    if any(not 0 < f <= 1 for f in fractions):
        parser.error(f"--fractions: each must be in (0, 1], got {args.fractions}")
    setup_logging()
    work = args.work or Path(tempfile.mkdtemp(prefix="etl-scale-"))
    rows: list[dict] = []
    load = os.getloadavg()
    try:
        for fraction in fractions:
            tree = ensure_tree(args.tree_dir, fraction)
            out = work / f"dataset-{tree['train'] + tree['validation']}"
            shutil.rmtree(out, ignore_errors=True)
            row = {"fraction": fraction, "train": tree["train"],
                   "validation": tree["validation"], "tree_build_s": tree.get("build_s")}
            row.update(run_prepare(tree, out, args, work / f"events-{fraction}"))
            rows.append(row)
            print(growth_table(rows), flush=True)
            if not args.keep_output:
                shutil.rmtree(out, ignore_errors=True)
            write_json(args.out, _report(rows, args, load))
    finally:
        if args.work is None and not args.keep_output:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(growth_table(rows))
    worst = max(max(r["driver_python_peak_mb"], r["driver_jvm_peak_mb"]) for r in rows)
    verdict = "PASS" if worst * 1024 ** 2 < DRIVER_TARGET_BYTES else "FAIL"
    print(f"\ndriver peak memory (largest of Python and JVM, any size): {worst:.0f} MB, "
          f"goal < {DRIVER_TARGET_BYTES / 1024 ** 3:.0f} GB: {verdict}")
    return 0 if verdict == "PASS" else 1


def _report(rows: list[dict], args, load) -> dict:
    return {"benchmark": "etl_scale",
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "settings": {"master": args.master, "shards": args.shards,
                         "validation_shards": args.validation_shards, "resize": args.resize,
                         "format": args.format},
            "machine": {"cpus": os.cpu_count(), "loadavg_at_start": [round(v, 2) for v in load],
                        "python": platform.python_version()},
            "runs": rows}


if __name__ == "__main__":
    raise SystemExit(main())
