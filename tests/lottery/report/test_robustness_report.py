"""The report's robustness section (lottery.report.robustness) from real result files, checked
against a hand computation of the replicate statistics."""
from __future__ import annotations

import math

from common.atomic import write_json
from lottery.grid.robustness_plan import load_robustness_results
from lottery.report.robustness import collect, paired_robustness_table, robustness_table


def _result(sub, target, eps, acc, control, replicate, sparsity):
    point = {"control": control, "target_sparsity": sparsity, "sparsity": sparsity,
             "rewind": "init", "replicate": replicate}
    write_json(sub / "results" / f"{target}--eps{eps}.json",
               {"task_id": f"{target}--eps{eps}", "result": {
                   "target": target, "point": point, "epsilon": eps, "robust_accuracy": acc,
                   "attack": {"attack": "pgd", "steps": 10, "restarts": 1}}})


def test_tables_hold_means_intervals_and_verdicts(tmp_path):
    sub = tmp_path / "robustness-0000abcd"
    (sub / "results").mkdir(parents=True)
    write_json(sub / "settings.json", {"kind": "lottery-grid"})
    ticket = {0: 0.5, 1: 0.6, 2: 0.7}
    reinit = {0: 0.4, 1: 0.45, 2: 0.65}
    for r in range(3):
        _result(sub, f"t-rep{r}", 0.1, ticket[r], "none", r, 0.9)
        _result(sub, f"c-rep{r}", 0.1, reinit[r], "random_reinit", r, 0.9)
    _result(sub, "dense", 0.1, 0.8, "dense", 0, 0.0)
    rows = load_robustness_results(tmp_path)
    assert len(rows) == 7
    cells = collect(rows)["PGD-10"]
    table = robustness_table(cells)
    # mean 0.6, sd 0.1, t(0.975, 2) = 4.302653: half-width 0.248414
    half = 4.302653 * 0.1 / math.sqrt(3)
    assert f"| 90.00% | ticket | 0.6000 ± {half:.4f} (n=3) |" in table
    assert "| 0.00% | dense | 0.8000 |" in table
    # differences 0.1, 0.15, 0.05: mean 0.1, sd 0.05 -> interval [-0.0242, 0.2242] straddles 0
    pairs = paired_robustness_table(cells)
    d_half = 4.302653 * 0.05 / math.sqrt(3)
    assert f"| +0.1000 | [{0.1 - d_half:.4f}, {0.1 + d_half:.4f}] | no detectable difference |" in pairs
    assert "| 90.00% | init | reinit | 0.1 | 3 |" in pairs
