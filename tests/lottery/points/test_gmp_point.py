"""GMP as a grid point kind: planned beside a ticket, trained, resumed after a stop, reported."""
from __future__ import annotations

import numpy as np
import pytest

from common.atomic import read_json
from common.settings import make_settings
from lottery.grid.plan import load_tasks, plan
from lottery.grid.plan_gmp import gmp_task_id
from lottery.grid.settings import GridSettings


def test_gmp_sparsities_plan_gmp_tasks_and_leave_other_grids_alone():
    from lottery.grid.plan import grid_hash

    plain = make_settings(GridSettings, {"sparsities": [0.9], "epochs": 2})
    with_gmp = make_settings(GridSettings, {"sparsities": [0.9], "epochs": 2, "gmp_sparsities": "0.9,0.97"})
    assert plain.gmp_sparsities == () and with_gmp.gmp_sparsities == (0.9, 0.97)
    assert grid_hash(plain) != grid_hash(with_gmp)
    assert gmp_task_id("global", 0.97, 2) == "gmp-global-s9700-init-rep2"
    with pytest.raises(Exception, match="gmp_sparsities"):
        make_settings(GridSettings, {"sparsities": [0.9], "gmp_sparsities": [1.0]})


@pytest.mark.slow
def test_a_gmp_point_and_a_ticket_in_one_grid_and_one_report(digits_dir, tmp_path):
    from common.stop import Preempted, StopToken
    from lottery.grid.scheduler import run_grid
    from lottery.points.runners import train_point
    from lottery.report.build import build_report
    from train.run import train_dense
    from train.settings import DenseSettings

    run = train_dense(DenseSettings(data=str(digits_dir), model="lenet_300_100", out=str(tmp_path),
                                    epochs=2, batch_size=64, lr=0.05, augment="none"))
    grid = plan(run.root, make_settings(GridSettings, {
        "sparsities": [0.9], "gmp_sparsities": [0.9], "epochs": 2, "exclude": ["logits"]}))
    tasks = {t.task_id: t for t in load_tasks(grid.root)}
    gmp = tasks["gmp-global-s9000-init"]
    assert gmp.kind == "gmp" and gmp.sparsity == 0.9 and gmp.exclude == ("logits",)

    # Stopped during its second epoch, the point resumes from its first (masks included).
    class StopAfter(StopToken):
        """Requests a stop at its 30th check: a batch of epoch 2 (23 batches an epoch)."""

        checks = 0

        def raise_if_requested(self, where=""):
            self.checks += 1
            if self.checks == 30:
                self.request()
            super().raise_if_requested(where)

    token = StopAfter()
    with pytest.raises(Preempted):
        train_point(run.root, grid.root, gmp, read_json(grid.settings)["settings"], token)
    assert read_json(grid.partial_state(gmp.task_id) / "state.json")["epochs_done"] == 1

    assert len(run_grid(grid.root).executed) == 2
    result = read_json(grid.results / f"{gmp.task_id}.json")["result"]
    assert result["resumed_from_epoch"] == 1
    prunable = 768 * 300 + 300 * 100
    assert result["total_weights"] == prunable + 100 * 10
    assert result["remaining_weights"] == prunable + 1000 - int(np.floor(0.9 * prunable + 0.5))
    ticket = read_json(grid.results / "oneshot-global-s9000-init-none.json")["result"]
    assert result["sparsity"] == pytest.approx(ticket["sparsity"], abs=1e-5)  # equal sparsity
    assert 0.1 < result["accuracy"] <= 1.0
    text = build_report(grid.root)["report"].read_text()
    assert "## Gradual magnitude pruning vs tickets" in text
    assert f"| 0.9000 | {result['sparsity']:.4f} | {result['accuracy']:.4f} | {ticket['accuracy']:.4f}" in text

    # Compression section end to end: the dense run and both points exported by deploy (float32 and
    # full int8 only, short timing windows), then the report rebuilt from those files.
    from deploy.quantize import Options, quantize_target
    from deploy.targets import grid_targets, run_target

    fast = Options(variants=("float32", "full_int8"), seconds=0.1, representative=32, max_records=128)
    points, missing = grid_targets(grid.root)
    assert missing == [] and len(points) == 2
    for target in [run_target(run.root), *points]:
        quantize_target(target, fast)
    report = build_report(grid.root)
    table = report["compression_table"].splitlines()
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table[2:]}
    assert list(rows) == ["dense", "GMP", "lottery ticket", "GMP + int8"]
    assert rows["dense"][1] == f"`{run.root.name}`" and rows["GMP"][1] == f"`{gmp.task_id}`"
    assert rows["lottery ticket"][1] == "`oneshot-global-s9000-init-none`"
    assert [r[2] for r in rows.values()] == ["float32", "float32", "float32", "full_int8"]

    def count(row, column):  # parameters, non-zeros, file bytes, gzip bytes
        return int(row[column].replace(",", ""))

    params = count(rows["dense"], 4)
    assert params == prunable + 300 + 100 + 1000 + 10 and count(rows["dense"], 5) > 0.99 * params
    for name in ("GMP", "lottery ticket", "GMP + int8"):
        assert count(rows[name], 4) == params
        assert count(rows[name], 5) < 0.2 * params, name   # 90% of the prunable weights are zeros
        assert 0.1 < float(rows[name][3]) <= 1.0
    assert count(rows["GMP + int8"], 6) < 0.35 * count(rows["GMP"], 6)      # int8 vs float32 file
    assert count(rows["GMP + int8"], 7) < count(rows["GMP"], 7) < count(rows["dense"], 7)  # gzip
    plot = grid.plots / "accuracy_vs_gzip_bytes.png"
    assert plot in report["plots"] and plot.stat().st_size > 1000
    assert "## Compression: dense vs GMP vs lottery ticket vs GMP + int8" in report["report"].read_text()
