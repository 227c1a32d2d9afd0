"""Claim files: processes that share a grid directory without MPI never run one point twice.

Protocol (works on any POSIX file system that honours O_EXCL and link(), NFS v3+ included):

- claim:    create claims/<task>.claim with O_CREAT|O_EXCL (only one creator wins), then check
            that no result exists (a point finished between our listing and our claim is dropped).
- heartbeat: a background thread touches every held claim through its open descriptor (futimens
            on the fd touches OUR inode even if the path was since taken over, never someone else's).
- stale:    a claim whose mtime is older than `stale_after` seconds, measured against the file
            system's own clock (a probe file's mtime), so clock skew between hosts does not matter;
            also, at once, a claim of a process of THIS host that no longer exists.
- reclaim:  link() the stale claim to claims/<task>.stale-<inode>-<mtime>: the name is the same for
            every reclaimer that saw the same stale file and link() never overwrites, so exactly one
            wins; the winner checks the link is the inode it judged stale, unlinks the claim and
            claims afresh with O_EXCL like anyone else.
- done:     the result file (written atomically by the caller) means done; the claim is removed.

A claim file holds JSON: `owner` (host:pid[:tag] of the process that heartbeats it, which the
staleness check reads), `task_id`, `claimed_at` and `worker` (`host`, `pid`, and `rank` under MPI:
where the point runs, which `lottery status` shows; under MPI rank 0 claims for every rank).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from common.paths import GridPaths

log = logging.getLogger(__name__)

DEFAULT_HEARTBEAT = 10.0     # seconds between touches of a held claim
DEFAULT_STALE_AFTER = 120.0  # a claim untouched this long belongs to a dead worker


@dataclasses.dataclass
class Claim:
    task_id: str
    path: Path
    fd: int
    inode: int
    lost: bool = False


@dataclasses.dataclass(frozen=True)
class ClaimInfo:
    task_id: str
    owner: str
    age: float      # seconds since the last heartbeat, by the file system's clock
    stale: bool
    host: str | None = None   # where the point runs (the claim's `worker`)
    pid: int | None = None
    rank: int | None = None   # MPI rank running the point; None outside MPI


def default_owner(tag: str = "") -> str:
    return f"{socket.gethostname()}:{os.getpid()}" + (f":{tag}" if tag else "")


def this_worker(rank: int | None = None) -> dict:
    """The `worker` of a claim for a point run by this process."""
    worker: dict = {"host": socket.gethostname(), "pid": os.getpid()}
    if rank is not None:
        worker["rank"] = rank
    return worker


class ClaimStore:
    """Claims on the tasks of one grid directory, with a heartbeat thread for the held ones."""

    def __init__(self, grid: GridPaths, owner: str | None = None, *,
                 heartbeat: float = DEFAULT_HEARTBEAT, stale_after: float = DEFAULT_STALE_AFTER):
        if heartbeat <= 0 or stale_after <= 2 * heartbeat:
            raise ValueError(f"stale_after ({stale_after}) must exceed twice the heartbeat "
                             f"({heartbeat}), or live claims would look stale")
        self.grid = grid
        self.owner = owner or default_owner()
        self.heartbeat = heartbeat
        self.stale_after = stale_after
        self._held: dict[str, Claim] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._clock_offset = 0.0       # the file system's clock minus ours
        self._clock_probed_at: float | None = None
        grid.claims.mkdir(parents=True, exist_ok=True)

    # -- claiming ------------------------------------------------------------------------
    def try_claim(self, task_id: str, worker: dict | None = None) -> Claim | None:
        """Claim `task_id` if it has no result and no live claim; None otherwise. `worker`: where
        the point will run (host, pid, rank), when not in this process."""
        if self.grid.result(task_id).exists():
            return None
        path = self.grid.claim(task_id)
        worker = worker or this_worker()
        claim = self._create(task_id, path, worker)
        if claim is None and self._reclaim_if_stale(task_id, path):
            claim = self._create(task_id, path, worker)
        if claim is None:
            return None
        if self.grid.result(task_id).exists():  # finished between our check and our claim
            self.release(claim)
            return None
        with self._lock:
            self._held[task_id] = claim
        self._ensure_heartbeat()
        return claim

    def _create(self, task_id: str, path: Path, worker: dict) -> Claim | None:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        os.write(fd, json.dumps({"owner": self.owner, "task_id": task_id,
                                 "claimed_at": time.time(), "worker": worker}).encode())
        # No fsync: O_EXCL alone decides who holds the point, and a claim whose content a crash
        # lost goes stale by its mtime like any other. An fsync per claim was most of rank 0's
        # cost per hand-out (~5 ms of ~7), which 80 ranks on short points saturated.
        return Claim(task_id, path, fd, os.fstat(fd).st_ino)

    def _fs_time(self) -> float:
        """The file system's clock, probed at most once per heartbeat: a probe creates and removes
        a file in claims/, which 80 launches judging every held claim on every walk turned into
        the main cost of claiming (and contention on the directory); the offset between the two
        clocks drifts far slower than that."""
        if self._clock_probed_at is None or time.monotonic() - self._clock_probed_at > self.heartbeat:
            self._clock_offset = _fs_now(self.grid.claims) - time.time()
            self._clock_probed_at = time.monotonic()
        return time.time() + self._clock_offset

    def _reclaim_if_stale(self, task_id: str, path: Path) -> bool:
        try:
            st = path.stat()
        except FileNotFoundError:
            return True  # released meanwhile: try to create again
        age = self._fs_time() - st.st_mtime
        owner = _owner_of(path)
        if age <= self.stale_after and not _dead_on_this_host(owner):
            return False
        aside = path.with_name(f"{path.name}.stale-{st.st_ino}-{st.st_mtime_ns}")
        try:
            os.link(path, aside)
        except FileExistsError:
            return False  # another reclaimer won this stale claim
        except FileNotFoundError:
            return True
        if aside.stat().st_ino != st.st_ino:
            aside.unlink(missing_ok=True)  # the path was replaced after we looked: not ours
            return False
        path.unlink(missing_ok=True)
        log.warning("reclaimed the claim of %s from %s (dead process, or no heartbeat for %.0f s)",
                    task_id, owner, age)
        return True

    def release(self, claim: Claim) -> None:
        """Drop a claim (after its result is written, or when giving the task back)."""
        with self._lock:
            self._held.pop(claim.task_id, None)
        try:
            if os.stat(claim.path).st_ino == claim.inode:
                claim.path.unlink()
        except FileNotFoundError:
            pass
        with contextlib.suppress(OSError):
            os.close(claim.fd)

    # -- heartbeat -----------------------------------------------------------------------
    def _ensure_heartbeat(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name="claim-heartbeat", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            self.touch_all()

    def touch_all(self) -> None:
        with self._lock:
            held = list(self._held.values())
        for claim in held:
            try:
                os.utime(claim.fd)
                if os.stat(claim.path).st_ino != claim.inode and not claim.lost:
                    claim.lost = True
            except FileNotFoundError:
                claim.lost = True
            except OSError as err:  # e.g. fd closed by a concurrent release
                log.debug("heartbeat of %s: %s", claim.task_id, err)
            if claim.lost:
                log.error("claim on %s was taken over (were we paused longer than %.0f s?)",
                          claim.task_id, self.stale_after)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            held = list(self._held.values())
        for claim in held:
            self.release(claim)

    def __enter__(self) -> "ClaimStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fs_now(directory: Path) -> float:
    """'Now' by the clock that stamps mtimes on this file system (the server's, on NFS)."""
    probe = directory / f".clock-{uuid.uuid4().hex}"
    with open(probe, "wb"):
        pass
    try:
        return probe.stat().st_mtime
    finally:
        probe.unlink(missing_ok=True)


def _claim_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_bytes()[:4096])
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _owner_of(path: Path) -> str:
    return str(_claim_record(path).get("owner", "?"))


def _int_or_none(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _dead_on_this_host(owner: str) -> bool:
    """A claim whose owner ran on this host under a pid that no longer exists is dead now,
    without waiting for its heartbeat to go stale (a re-run right after a crash)."""
    host, _, rest = owner.partition(":")
    pid_text = rest.split(":", 1)[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def list_claims(grid: GridPaths, stale_after: float = DEFAULT_STALE_AFTER) -> list[ClaimInfo]:
    """Current claims of a grid (for `lottery status`), with their age and staleness."""
    if not grid.claims.is_dir():
        return []
    try:
        now = _fs_now(grid.claims)
    except OSError:  # read-only view of the grid: fall back to the local clock
        now = time.time()
    out = []
    for p in sorted(grid.claims.glob("*.claim")):
        try:
            age = now - p.stat().st_mtime
        except FileNotFoundError:
            continue
        record = _claim_record(p)
        owner = str(record.get("owner", "?"))
        worker = record.get("worker") if isinstance(record.get("worker"), dict) else {}
        host = worker.get("host") or owner.partition(":")[0] or None   # claims without `worker`
        out.append(ClaimInfo(p.name[:-len(".claim")], owner, age, age > stale_after,
                             host=str(host) if host else None, pid=_int_or_none(worker.get("pid")),
                             rank=_int_or_none(worker.get("rank"))))
    return out
