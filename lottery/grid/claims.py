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


def default_owner(tag: str = "") -> str:
    return f"{socket.gethostname()}:{os.getpid()}" + (f":{tag}" if tag else "")


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
        grid.claims.mkdir(parents=True, exist_ok=True)

    # -- claiming ------------------------------------------------------------------------
    def try_claim(self, task_id: str) -> Claim | None:
        """Claim `task_id` if it has no result and no live claim; None otherwise."""
        if self.grid.result(task_id).exists():
            return None
        path = self.grid.claim(task_id)
        claim = self._create(task_id, path)
        if claim is None and self._reclaim_if_stale(task_id, path):
            claim = self._create(task_id, path)
        if claim is None:
            return None
        if self.grid.result(task_id).exists():  # finished between our check and our claim
            self.release(claim)
            return None
        with self._lock:
            self._held[task_id] = claim
        self._ensure_heartbeat()
        return claim

    def _create(self, task_id: str, path: Path) -> Claim | None:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        os.write(fd, json.dumps({"owner": self.owner, "task_id": task_id,
                                 "claimed_at": time.time()}).encode())
        os.fsync(fd)
        return Claim(task_id, path, fd, os.fstat(fd).st_ino)

    def _reclaim_if_stale(self, task_id: str, path: Path) -> bool:
        try:
            st = path.stat()
        except FileNotFoundError:
            return True  # released meanwhile: try to create again
        age = _fs_now(self.grid.claims) - st.st_mtime
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


def _owner_of(path: Path) -> str:
    try:
        return str(json.loads(path.read_bytes()[:4096]).get("owner", "?"))
    except (OSError, ValueError, AttributeError):
        return "?"


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
        out.append(ClaimInfo(p.name[:-len(".claim")], _owner_of(p), age, age > stale_after))
    return out
