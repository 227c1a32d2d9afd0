"""Deterministic shard assignment and in-shard order.

A record's shard and its position inside the shard depend only on (seed, split, key): not on the
source's partitioning, the number of Spark tasks, retries or the order inputs were listed in. That is
what makes a re-run, a resumed run and a clean run produce byte-identical shards.
"""
from __future__ import annotations

import hashlib


def _digest(seed: int, split: str, key: str) -> bytes:
    return hashlib.blake2b(f"{seed}\x00{split}\x00{key}".encode(), digest_size=16).digest()


def shard_of(seed: int, split: str, key: str, shards: int) -> int:
    return int.from_bytes(_digest(seed, split, key)[:8], "big") % shards


def order_key(seed: int, split: str, key: str) -> tuple[bytes, str]:
    """Sort key inside a shard: a seeded pseudo-random (so shards are shuffled) total order."""
    return (_digest(seed, split, key)[8:], key)
