"""The `spark-submit` lines of HowToRun.md, run as written from a shell whose virtualenv is not
activated: the one documented setting (PYSPARK_PYTHON) is enough, and stdout holds the dataset path
alone while the project's log lines go to stderr (Spark merges the Python driver's stderr into its
stdout; common.logs separates them again)."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.cluster.slurm_cluster import REPO

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

DOCUMENTED_OUT = "data/digits-submit"


def _documented_commands() -> list[str]:
    """The `export PYSPARK_PYTHON=...` line and the local spark-submit command of HowToRun.md's
    spark-submit section, continuation lines joined, exactly as a reader would paste them."""
    text = (REPO / "HowToRun.md").read_text()
    blocks = re.findall(r"^```\n(.*?)^```", text, flags=re.S | re.M)
    block = next(b for b in blocks if "export PYSPARK_PYTHON=" in b and "'local[1]'" in b)
    lines = block.replace("\\\n", " ").splitlines()
    export = next(line for line in lines if line.startswith("export PYSPARK_PYTHON="))
    submit = next(line for line in lines if line.startswith(".venv/bin/spark-submit --master 'local[1]'"))
    assert f"--out {DOCUMENTED_OUT} " in submit + " "
    return [export, submit]


def _plain_shell_env() -> dict[str, str]:
    """The user's shell before `source .venv/bin/activate`: no venv on PATH, no Spark settings."""
    venv_bin = str(REPO / ".venv" / "bin")
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "SPARK_HOME",
                        "PYTHONPATH", "PYTHONHOME", "BIGTICKET_LOG_LEVEL")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and Path(p).resolve() != Path(venv_bin).resolve())
    return env


def _run_in_plain_shell(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", "set -e\n" + script], cwd=REPO, env=_plain_shell_env(),
                          capture_output=True, text=True, timeout=600)


def test_documented_spark_submit_works_without_the_venv_activated(tmp_path):
    export, submit = _documented_commands()
    out = tmp_path / "digits-submit"
    done = _run_in_plain_shell(export + "\n" + submit.replace(DOCUMENTED_OUT, str(out)))
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout == f"{out}\n"  # what a script reads: the dataset, nothing else
    assert (out / "_SUCCESS").is_file()
    assert re.search(r"^\d\d:\d\d:\d\d INFO etl\.job: dataset complete: ", done.stderr, re.M)
    assert re.search(r"INFO etl\.job: split train: \d+ inputs", done.stderr)


def test_usage_errors_under_spark_submit_go_to_stderr(tmp_path):
    export, submit = _documented_commands()
    bad = submit.replace(DOCUMENTED_OUT, str(tmp_path / "bad")).replace("--resize fixed:8",
                                                                         "--resize banana")
    assert bad != submit.replace(DOCUMENTED_OUT, str(tmp_path / "bad"))
    done = _run_in_plain_shell(export + "\n" + bad)
    assert done.returncode == 2
    assert done.stdout == ""
    assert "bigticket etl prepare: error: --resize:" in done.stderr
