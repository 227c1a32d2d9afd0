"""A real one-node SLURM cluster on 127.0.0.1 for the cluster tests (Debian 12's slurm 22.05).

`SlurmCluster.start()` installs the Debian packages when missing (root only), writes a slurm.conf
into a temporary directory, starts munged, slurmctld and slurmd in the foreground as our own child
processes (no systemd), and waits until `sinfo` reports the node idle. `stop()` terminates exactly
those children. Anything that prevents a working cluster raises `SlurmUnavailable` with the reason,
which the fixture turns into a skip.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
PARTITION = "debug"
MUNGE_SOCKET_DIR = Path("/run/munge")


class SlurmUnavailable(RuntimeError):
    """No working SLURM here (not root, no packages, daemons did not come up)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            # slurmd drains a node whose real memory is below the configured value: stay under it.
            return int(int(line.split()[1]) / 1024 * 0.9)
    raise SlurmUnavailable("cannot read MemTotal from /proc/meminfo")


def ensure_packages(timeout: float = 600) -> None:
    missing = [cmd for cmd in ("slurmctld", "slurmd", "sbatch", "munged") if not shutil.which(cmd)]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"{', '.join(missing)} not installed and not running as root "
                               f"(install: apt-get install {' '.join(PACKAGES)})")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable(f"{', '.join(missing)} not installed and no apt-get on this machine")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        log.info("installing SLURM: %s", " ".join(cmd))
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")


def stop_processes(procs: list[subprocess.Popen], timeout: float) -> None:
    """Stop exactly these processes, newest first: SIGTERM, then SIGKILL after `timeout` s.

    Tests never stop daemons by name: other jobs on the machine may run the same programs.
    """
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            log.info("stopped %s (pid %d)", proc.args[0], proc.pid)


class SlurmCluster:
    def __init__(self, workdir: Path, cpus: int = 2):
        self.workdir = Path(workdir)
        self.cpus = cpus
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.workdir / "slurm.conf"
        self.jobcomp = self.workdir / "jobcomp.log"
        self._procs: list[subprocess.Popen] = []

    # -- environment for clients (sbatch, squeue, ...) and for the jobs they submit --
    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def write_conf(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        w = self.workdir
        text = f"""\
ClusterName=bigticket-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job waits cred_expire seconds before it may start again (default 120)
AuthInfo=cred_expire=5
CredType=cred/munge
StateSaveLocation={w}/state
SlurmdSpoolDir={w}/spool
SlurmctldPidFile={w}/slurmctld.pid
SlurmdPidFile={w}/slurmd.pid
SlurmctldLogFile={w}/log/slurmctld.log
SlurmdLogFile={w}/log/slurmd.log
# no cgroups in the containers and VMs we test on
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp}
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# pmix fails with the MPICH wheel's Hydra
MpiDefault=pmi2
# sbatch --wait returns promptly; impossible requests fail at submission instead of pending forever
MinJobAge=5
SchedulerParameters=batch_sched_delay=0
EnforcePartLimits=ALL
ReturnToService=2
KillWait=5
SlurmdTimeout=60
NodeName={self.node} NodeAddr=127.0.0.1 NodeHostname={self.node} CPUs={self.cpus} RealMemory={_memory_mb()} State=UNKNOWN
PartitionName={PARTITION} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
        self.conf.write_text(text)

    def _munge_works(self) -> bool:
        if not shutil.which("munge"):
            return False
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if cred.returncode != 0:
            return False
        return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True,
                              timeout=10).returncode == 0

    def _spawn(self, name: str, cmd: list[str], **kwargs) -> subprocess.Popen:
        out = open(self.workdir / "log" / f"{name}.out", "ab")
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                start_new_session=True, **kwargs)
        out.close()
        self._procs.append(proc)
        log.info("started %s (pid %d)", name, proc.pid)
        return proc

    def _wait(self, what: str, ok, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [p for p in self._procs if p.poll() is not None]
            if dead:
                raise SlurmUnavailable(f"{what}: {dead[0].args[0]} exited with {dead[0].returncode}"
                                       f"; logs in {self.workdir / 'log'}")
            if ok():
                return
            time.sleep(0.3)
        raise SlurmUnavailable(f"{what}: not ready after {timeout:.0f}s; logs in {self.workdir / 'log'}")

    def start(self, timeout: float = 60) -> "SlurmCluster":
        if os.geteuid() != 0:
            raise SlurmUnavailable("the SLURM test cluster needs root (slurmd runs jobs as any user)")
        ensure_packages()
        self.write_conf()
        try:
            if not self._munge_works():
                MUNGE_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
                shutil.chown(MUNGE_SOCKET_DIR, "munge", "munge")
                # munged refuses to run as root; its key belongs to the munge user.
                self._spawn("munged", ["/usr/sbin/munged", "--foreground"], user="munge", group="munge")
                self._wait("munged", self._munge_works, 15)
            self._spawn("slurmctld", ["/usr/sbin/slurmctld", "-D", "-f", str(self.conf)])
            self._wait("slurmctld", lambda: self._run_quiet(["scontrol", "ping"]), timeout)
            self._spawn("slurmd", ["/usr/sbin/slurmd", "-D", "-f", str(self.conf), "-N", self.node])
            self._wait("slurmd", self._node_idle, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _run_quiet(self, cmd: list[str]) -> bool:
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=15)
        return done.returncode == 0 and "DOWN" not in done.stdout

    def _node_idle(self) -> bool:
        done = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True,
                              text=True, timeout=15)
        return done.returncode == 0 and done.stdout.strip() == "idle"

    def stop(self) -> None:
        """Stop exactly the daemons we started, newest first (slurmd, slurmctld, munged)."""
        stop_processes(self._procs, timeout=15)
        self._procs.clear()

    # -- helpers for tests --
    def sbatch(self, args: list[str], *, env: dict[str, str] | None = None, cwd=None,
               timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(["sbatch", *args], env={**self.env, **(env or {})}, cwd=cwd,
                              capture_output=True, text=True, timeout=timeout)

    def scontrol(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["scontrol", *args], env=self.env, capture_output=True, text=True,
                              timeout=30)

    def job_state(self, job_id: str) -> str:
        """Current state from squeue, else the final one from the job-completion log."""
        done = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], env=self.env,
                              capture_output=True, text=True, timeout=15)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip()
        return self.completed_state(job_id) or "UNKNOWN"

    def completed_state(self, job_id: str) -> str | None:
        """The last JobState recorded for this job in the job-completion log (None if none)."""
        if not self.jobcomp.exists():
            return None
        state = None
        for line in self.jobcomp.read_text().splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if fields.get("JobId") == job_id:
                state = fields.get("JobState")
        return state

    def wait_finished(self, job_id: str, timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                         "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"):
                return state
            time.sleep(1)
        raise TimeoutError(f"job {job_id} not finished after {timeout}s (state {self.job_state(job_id)})")


REPO = Path(__file__).resolve().parents[2]
PYTHON = Path(os.environ.get("BIGTICKET_PYTHON", REPO / ".venv" / "bin" / "python"))


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes containing `text` (e.g. a test's unique temp dir)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline.strip()}")
    return found


def tiny_image_folder(root: Path, classes: int = 2, train: int = 8, validation: int = 2) -> Path:
    """An ImageNet-style folder (train/<synset>/*.JPEG, validation/<synset>/*.JPEG) of small
    random RGB images: enough for the ETL and a few training steps, fast on a shared machine."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("validation", validation)):
        for c in range(classes):
            folder = Path(root) / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
                pixels[..., c % 3] = 255  # a class-dependent colour, so labels are learnable
                Image.fromarray(pixels).save(folder / f"{split}_{c}_{i}.JPEG", quality=90)
    return Path(root)
