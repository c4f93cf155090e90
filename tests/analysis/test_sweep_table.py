"""The sweep's t x block pivot table, as the demo prints it."""

from pipelines.analysis.sweep import SweepResult, SweepRow, pivot_table


def test_pivot_table_has_a_row_per_t_and_a_column_per_block():
    rows = [SweepRow(t, b, 8, 10, 10, acc, 1.0, acc / 2, 1.0) for t, b, acc in
            [(0, "block0", 0.5), (0, "block1", 0.75), (10, "block0", 0.25), (10, "block1", 1.0)]]
    result = SweepResult("r", 4, 20, 0.1, rows, runs={}, settings={})
    assert pivot_table(result).splitlines() == [
        "| t | block0 | block1 |", "|---|---|---|", "| 0 | 0.500 | 0.750 |", "| 10 | 0.250 | 1.000 |",
    ]
    assert pivot_table(result, "knn_top1").splitlines()[2] == "| 0 | 0.250 | 0.375 |"
