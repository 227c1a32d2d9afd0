"""A grid over replicate dense runs: dense runs of one configuration that differ only in seed.

A dense run's directory name hashes its settings, seed included (train.run.run_hash), so
`bigticket train dense ... --seed 1`, `--seed 2` are distinct runs of one configuration side by
side under the same --out. `bigticket lottery plan --run R0 --run R1 --run R2` plans one grid
under R0 whose replicate r retrains run r (GridSettings.replicate_runs holds the names of R1, R2):
every replicate gets its own masks from its own run's final weights, and the report's statistics
then cover the variation of dense training too, not only of retraining.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from common.atomic import read_json
from common.settings import SettingsError

# Settings that may differ between replicate runs: the seed, and where inputs and outputs live
# (train.settings.NON_IDENTITY_FIELDS).
MAY_DIFFER = ("seed", "data", "out", "master")


def replicate_run_names(first: str | os.PathLike, others: Sequence[str | os.PathLike]) -> tuple[str, ...]:
    """The directory names of `others`, which must be siblings of `first` (SettingsError naming the
    --run otherwise): the grid records names, so moving the runs together keeps it valid."""
    parent = Path(first).resolve().parent
    names = []
    for other in others:
        path = Path(other).resolve()
        if path.parent != parent:
            raise SettingsError(f"--run {other}: replicate dense runs must sit beside the first "
                                f"({parent}), as runs of one configuration trained with one --out do")
        names.append(path.name)
    return tuple(names)


def check_same_configuration(first: Mapping[str, Any], other: Mapping[str, Any], first_path: Path,
                             other_path: Path) -> None:
    """SettingsError naming the first differing field unless the two dense runs' settings.json
    records differ only in MAY_DIFFER (and their seeds differ, and their datasets are the same)."""
    a, b = first.get("settings") or {}, other.get("settings") or {}
    for field in sorted(set(a) | set(b)):
        if field not in MAY_DIFFER and a.get(field) != b.get(field):
            raise SettingsError(f"--run {other_path.parent}: not a replicate of {first_path.parent}: "
                                f"settings.{field} is {b.get(field)!r} there, {a.get(field)!r} in the "
                                f"first run (replicate dense runs may differ only in seed)")
    if a.get("seed") == b.get("seed"):
        raise SettingsError(f"--run {other_path.parent}: same seed ({a.get('seed')}) as "
                            f"{first_path.parent}: a replicate needs another seed")
    if first.get("manifest_sha256") != other.get("manifest_sha256"):
        raise SettingsError(f"--run {other_path.parent}: trained on another dataset than "
                            f"{first_path.parent} (manifest_sha256 differs)")


def check_replicate_runs(first_settings: Path, others: Sequence[Path]) -> None:
    """Each of `others` (settings.json of finished runs) against the first; seeds all distinct."""
    first = read_json(first_settings)
    seeds = {(first.get("settings") or {}).get("seed"): first_settings}
    for path in others:
        record = read_json(path)
        check_same_configuration(first, record, first_settings, path)
        seed = (record.get("settings") or {}).get("seed")
        if seed in seeds:
            raise SettingsError(f"--run {path.parent}: same seed ({seed}) as {seeds[seed].parent}")
        seeds[seed] = path
