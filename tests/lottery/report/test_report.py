"""Reports of a finished grid: tables, report.md, plots; run on results of the sleep workload."""
from __future__ import annotations

import csv
import json
import logging

import pytest

from common.atomic import read_json
from common.paths import GridPaths
from lottery.grid.simulate import expected_accuracy
from lottery.report.build import build_report
from lottery.report.progress import grid_progress
from lottery.report.results import result_row
from lottery.report.tables import accuracy_table


def test_tables_have_one_row_per_point(finished_grid):
    import pyarrow.parquet as pq

    out = build_report(finished_grid.root)
    table = pq.read_table(out["parquet"])
    assert table.num_rows == 39
    rows = table.to_pylist()
    for row in rows:
        task = read_json(finished_grid.result(row["task_id"]))["task"]
        assert row["accuracy"] == pytest.approx(expected_accuracy(task))
        assert row["remaining_fraction"] == pytest.approx(1 - row["sparsity"])
    with open(out["csv"], newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert [r["task_id"] for r in csv_rows] == [r["task_id"] for r in rows]
    assert out["dense_accuracy"] == pytest.approx(0.93)
    # Magnitude points leave the structured columns empty (same schema for every grid).
    assert all(row["params"] is None and row["speedup"] is None and row["criterion"] is None
               for row in rows)
    assert "## Structured pruning" not in out["report"].read_text() and out["structured_table"] == ""


def test_report_table_rows_are_sparsities_and_columns_rewinds(finished_grid):
    out = build_report(finished_grid.root)
    text = out["report"].read_text()
    header = next(line for line in text.splitlines() if line.startswith("| sparsity"))
    # Columns in training order of the rewind points, not in the order they were given.
    assert header == "| sparsity | rewind init | rewind 1ep | rewind final |"
    row90 = next(line for line in text.splitlines() if line.startswith("| 0.9000 |"))
    cells = [c.strip() for c in row90.strip("|").split("|")]
    want = expected_accuracy({"rewind": "1ep", "control": "none", "sparsity": 0.9})
    reinit = expected_accuracy({"rewind": "1ep", "control": "random_reinit", "sparsity": 0.9})
    assert cells[2].startswith(f"{want:.4f} (")
    assert f"reinit {reinit:.4f}" in cells[2] and "rand-mask" in cells[2]
    assert "dense accuracy: 0.9300" in text and "points finished: 39/39" in text
    assert "## Iterative magnitude pruning" in text
    assert text.count("| imp-global-r4-p5000-") == 12   # 3 chains x 4 rounds


def test_plots_are_written_and_readable(finished_grid):
    from PIL import Image

    out = build_report(finished_grid.root)
    names = sorted(p.name for p in out["plots"])
    assert names == ["accuracy_vs_sparsity.png", "imp.png", "training_curves.png"]
    for path in out["plots"]:
        with Image.open(path) as img:
            img.verify()
            assert img.format == "PNG" and img.size[0] > 500 and img.size[1] > 300


def test_partial_grid_and_bad_result_files(finished_grid, tmp_path):
    import shutil

    grid = GridPaths(tmp_path / "dense-x" / "lottery-copy")
    shutil.copytree(finished_grid.root, grid.root)
    for p in list(grid.results.iterdir())[:30]:
        p.unlink()
    (grid.results / "p-bogus.json").write_text("{not json")
    out = build_report(grid.root)
    assert out["rows"] == 9 and out["total"] == 39
    assert out["dense_accuracy"] is None  # no history.csv beside this copy
    assert out["validation_size"] is None and "Validation set: size unknown" in out["report"].read_text()
    progress = grid_progress(grid.root)
    assert progress["done"] == 9 and progress["pending"] == 30 and progress["eta_seconds"] is not None


def test_result_files_that_are_not_result_records_are_named_and_skipped(finished_grid, tmp_path, caplog):
    """A result file whose JSON is not an object (or not JSON, or whose result is not an object)
    must not crash `lottery status` or `bigticket report`: each is skipped with a warning naming it."""
    import shutil

    grid = GridPaths(tmp_path / "dense-x" / "lottery-copy")
    shutil.copytree(finished_grid.root, grid.root)
    ids = sorted(p.name[:-5] for p in grid.results.iterdir())[:4]
    bad = {ids[0]: "[]", ids[1]: "3", ids[2]: "{not json"}
    record = read_json(grid.result(ids[3]))
    bad[ids[3]] = json.dumps({**record, "result": 3})
    for task_id, text in bad.items():
        grid.result(task_id).write_text(text)
    with caplog.at_level(logging.WARNING):
        progress = grid_progress(grid.root)
    assert progress["done"] == 39 and progress["pending"] == 0  # a result file means done
    for task_id in bad:
        assert any(str(grid.result(task_id)) in r.getMessage() for r in caplog.records), task_id
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        out = build_report(grid.root)
    assert out["rows"] == 35 and out["total"] == 39
    for task_id in bad:
        assert any(str(grid.result(task_id)) in r.getMessage() for r in caplog.records), task_id
    assert "points finished: 35/39" in out["report"].read_text()


def test_quantile_rows_are_labelled_with_the_quantile():
    record = {"task_id": "t", "task": {"kind": "oneshot", "rewind": "init", "control": "none",
                                       "threshold": {"kind": "quantile", "value": 0.5}, "sparsity": 0.48},
              "result": {"accuracy": 0.9, "sparsity": 0.4812}}
    row = result_row(record)
    assert row["sparsity"] == 0.4812 and row["target_sparsity"] == 0.48
    assert "| 0.4812 (q 0.5) | 0.9000 |" in accuracy_table([row], ["init"])


def test_bigticket_report_prints_the_table_and_plot_paths(finished_grid, capsys):
    from bigticket.cli import main

    assert main(["report", str(finished_grid.root)]) == 0
    out = capsys.readouterr().out
    assert "| sparsity | rewind init | rewind 1ep | rewind final |" in out
    assert str(finished_grid.plots / "accuracy_vs_sparsity.png") in out
    assert str(finished_grid.report) in out
    assert main(["report", str(finished_grid.root / "missing")]) == 2
