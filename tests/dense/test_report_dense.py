"""The report's dense section: mIoU per (t, block), per-class IoU, ground truth beside predictions."""

import json

from typer.testing import CliRunner

from cli.main import app
from pipelines.report.results import collect_report


def test_dense_results_get_their_section_table_heatmap_and_examples(toy, tmp_path, one_torch_thread):
    path, _, _ = toy
    out = tmp_path / "results"
    for command, extra in (("segment", ["--blocks", "fine,coarse", "--grid"]), ("depth", ["--block", "fine"])):
        result = CliRunner().invoke(app, [command, path, "--timestep", "0", *extra, "--epochs", "2", "--quiet",
                                          "--out", str(out), "--json"])
        assert result.exit_code == 0, result.output
    segment = json.loads(next(out.glob("segment-*/results.json")).read_text())
    data = collect_report(path, out)
    assert not data.unreadable, data.unreadable
    dense = {item.value["task"]: item for item in data.of(["dense"])}
    assert set(dense) == {"segment", "depth"} and "dense" in data.sections
    item = dense["segment"]
    best = max(segment["heads"], key=lambda h: h["miou"])
    assert item.entry.score == best["miou"] and best["name"] in item.entry.metric
    assert [f.title for f in item.figures] == ["mIoU (test) per (t, block)",
                                               "ground truth and predictions of the first test images"]
    assert all(f.png.startswith(b"\x89PNG") for f in item.figures)
    assert dense["depth"].entry.metric.startswith("AbsRel")
    page = CliRunner().invoke(app, ["report", path, "--results", str(out), "--out", str(tmp_path / "r.html")])
    assert page.exit_code == 0, page.output
    html = (tmp_path / "r.html").read_text()
    assert "Dense prediction: segmentation and depth" in html and "per-class IoU" in html
    assert "mIoU per (t, block)" in html and "δ&lt;1.25" in html
