"""GMP points of a grid: gradual magnitude pruning during retraining, beside the tickets.

`gmp_sparsities` (GridSettings) asks for one point of kind "gmp" per final sparsity (and per
replicate), with the grid's scope and exclusions, retrained from the dense run's init checkpoint
for the grid's epochs (lottery.points.gmp), so tickets, GMP and structured points of one grid
compare at equal sparsity in one report. Task ids: gmp-<scope>-s<sparsity>-init[-rep<r>], e.g.
gmp-global-s9000-init.
"""
from __future__ import annotations

from lottery.grid.ids import derived_seed, fraction_tag, replicate_suffix
from lottery.points.task import Task

# The GMP axis at its default, as settings.json stores it: left out of a grid's identity, so grids
# planned before it keep their names (lottery.grid.plan.LATER_DEFAULTS).
GMP_GRID_DEFAULTS = {"gmp_sparsities": []}
GMP_REWIND = "init"


def gmp_task_id(scope: str, sparsity: float, replicate: int = 0) -> str:
    return f"gmp-{scope}-s{fraction_tag(sparsity)}-{GMP_REWIND}{replicate_suffix(replicate)}"


def gmp_tasks(settings) -> list[Task]:
    """One gmp task per (final sparsity, replicate) of resolved GridSettings (epochs set)."""
    tasks = []
    for sparsity in getattr(settings, "gmp_sparsities", ()) or ():
        for replicate in range(settings.replicates):
            task_id = gmp_task_id(settings.scope, sparsity, replicate)
            tasks.append(Task(
                task_id=task_id, kind="gmp", mask_id=None, base_mask_id=None, rewind=GMP_REWIND,
                control="none", scope=settings.scope, threshold={"kind": "sparsity", "value": sparsity},
                sparsity=float(sparsity), exclude=tuple(settings.exclude), epochs=settings.epochs,
                seed=derived_seed(settings.seed, task_id), cost=float(settings.epochs),
                replicate=replicate,
            ))
    return tasks


def check_gmp_sparsities(values) -> tuple[float, ...]:
    """GridSettings.gmp_sparsities: fractions in (0, 1), no two sharing an id tag."""
    values = tuple(float(v) for v in values)
    bad = [v for v in values if not 0.0 < v < 1.0]
    if bad:
        raise ValueError(f"gmp_sparsities: {bad} must lie in (0, 1)")
    tags = [fraction_tag(v) for v in values]
    if len(set(tags)) != len(tags):
        raise ValueError(f"gmp_sparsities: {list(values)} has values sharing a 4-decimal id")
    return values
