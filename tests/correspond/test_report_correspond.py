"""`featurestore report` on correspondence results: the table of every result gets a headline PCK
with its variant named, and each result a table of PCK per (t, block, threshold, average) and
alpha; the numbers are checked against PCK computed here from the saved matches CSV, and against
the maximum taken here over the maps of the results file."""

from __future__ import annotations

import csv
import html
import json
import re
from collections import defaultdict

import numpy as np
from typer.testing import CliRunner

from cli.main import app
from featurestore.store import FeatureStore
from featurestore.targets import RowTargets, write_pairs, write_targets
from pipelines.analysis import results_dir
from pipelines.report.html import render_html
from pipelines.report.results import collect_report

S = 16
N = 6
TIMESTEPS = [10, 20]
PAIRS = [(0, 1, "cat"), (2, 3, "cat"), (4, 5, "dog"), (1, 4, "dog")]


def make_store(path) -> str:
    """Six images of assorted sizes squashed to S x S, ten keypoints each, boxes, random 3 x 4 x 4 maps."""
    rng = np.random.default_rng(3)
    sizes = rng.integers(20, 50, (N, 2))
    keypoints = np.zeros((N, 10, 3), np.float32)
    keypoints[..., 0] = rng.uniform(0, 1, (N, 10)) * sizes[:, :1]
    keypoints[..., 1] = rng.uniform(0, 1, (N, 10)) * sizes[:, 1:]
    keypoints[..., 2] = 1
    boxes = np.column_stack([sizes * 0.1, sizes * 0.8]).astype(np.float32)
    store = FeatureStore.open(str(path), mode="a")
    ids = [f"img{i}" for i in range(N)]
    rows = store.add_images("toypairs", {"id": ids, "label": [0] * N, "class_name": ["x"] * N, "split": ["test"] * N,
                                         "domain": ["photo"] * N, "source": ids})
    run = store.create_run({"dataset": "toypairs", "backbone": "toynet", "resize": "squash"}, arrays={"b": (3, 4, 4)},
                           timesteps=TIMESTEPS, rows=rows, chunk_rows=8, dtype="float32",
                           provenance={"backbone": {"input": {"size": S}}})
    run.write_chunk(0, {(t, "b"): rng.standard_normal((N, 3, 4, 4)).astype(np.float32) for t in TIMESTEPS},
                    np.zeros(N, bool), [""] * N)
    write_targets(store, "toypairs", rows, resize="squash", size=S, info={"keypoints": {"names": None}, "bbox": {}},
                  load=lambda k: RowTargets(tuple(sizes[k]), np.array([S / sizes[k][0], 0.0, S / sizes[k][1], 0.0]),
                                            keypoints=keypoints[k], bbox=boxes[k]))
    write_pairs(store, "toypairs", [(rows[s], rows[t], c, "test") for s, t, c in PAIRS])
    return run.run_id


def csv_pck(path) -> dict[tuple[str, str, str], float]:
    """{(threshold, average, alpha): PCK} from a matches CSV: per image is the mean over pairs of
    each pair's fraction of points within alpha * max(w, h), per point the pooled fraction."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = {}
    for threshold, (w, h) in (("bbox", ("bbox_w", "bbox_h")), ("image", ("img_w", "img_h"))):
        for alpha in ("0.05", "0.1", "0.15"):
            by_pair, pooled = defaultdict(list), []
            for r in rows:
                d = np.hypot(float(r["pred_x"]) - float(r["true_x"]), float(r["pred_y"]) - float(r["true_y"]))
                ok = d <= float(alpha) * max(float(r[w]), float(r[h]))
                by_pair[r["pair"]].append(ok)
                pooled.append(ok)
            out[(threshold, "per_image", alpha)] = float(np.mean([np.mean(v) for v in by_pair.values()]))
            out[(threshold, "per_point", alpha)] = float(np.mean(pooled))
    return out


def table_rows(fragment: str) -> list[list[str]]:
    """The cells' text of every table row in an HTML fragment."""
    return [[html.unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", fragment, re.S)]


def section_of(page: str, anchor: str) -> str:
    return re.search(rf'<section id="{anchor}">(.*?)</section>', page, re.S).group(1)


def test_report_shows_correspondence_pck_tables_and_a_headline(tmp_path):
    path = tmp_path / "s.zarr"
    run_id = make_store(path)
    runner = CliRunner()
    both = runner.invoke(app, ["correspond", str(path), "--json", "--quiet"])
    assert both.exit_code == 0, both.output
    one = runner.invoke(app, ["correspond", str(path), "--timestep", "20", "--block", "b", "--save-matches",
                              str(tmp_path / "m.csv"), "--json", "--quiet"])
    assert one.exit_code == 0, one.output
    folder = results_dir(str(path), None)
    # the same result without boxes: the bbox threshold is undefined, the headline falls back to the image's
    no_box = json.loads(both.stdout)
    for m in no_box["maps"]:
        m["pck"]["overall"]["bbox"] = None
    (folder / "correspond-nobox.json").write_text(json.dumps(no_box))
    broken = json.loads(one.stdout)
    broken["maps"][0]["pck"]["overall"]["image"]["per_point"]["0.1"] = "high"
    (folder / "correspond-broken.json").write_text(json.dumps(broken))

    data = collect_report(str(path))
    page = render_html(data)
    assert [u.name for u in data.unreadable] == ["correspond-broken.json"]
    assert "PCK at t=20 b are not all numbers" in data.unreadable[0].note
    shown = {item.name: item for item in data.of(["correspond"])}
    assert len(shown) == 3 and '<a href="#correspond">Correspondence</a>' in page
    part = section_of(page, "correspond")

    # the one-map result: every PCK of the page equals PCK from the matches CSV, to the page's 3 decimals
    expected = csv_pck(tmp_path / "m.csv")
    assert 0 < expected[("image", "per_point", "0.15")] < 1  # not degenerate
    name = next(n for n in shown if f"{run_id}-t20-b-" in n)
    block = part[part.index(html.escape(name)):]
    rows = [r for r in table_rows(block) if r[:2] == ["20", "b"]][:4]
    assert [r[2:4] for r in rows] == [["bbox", "per_image"], ["bbox", "per_point"], ["image", "per_image"],
                                      ["image", "per_point"]]
    for r in rows:
        assert r[4:] == [f"{expected[(r[2], r[3], a)]:.3f}" for a in ("0.05", "0.1", "0.15")]
    assert shown[name].entry.score == expected[("bbox", "per_point", "0.1")]
    assert shown[name].entry.metric == "PCK@0.1 per point, bbox threshold (best map, t=20 b)"

    # the two-map result: its headline is the better map's PCK@0.1 per point (bbox), from the file here
    doc = json.loads(both.stdout)
    scores = {m["timestep"]: m["pck"]["overall"]["bbox"]["per_point"]["0.1"] for m in doc["maps"]}
    best = max(scores, key=scores.get)
    two = next(n for n in shown if n.endswith(".json") and "2maps" in n)
    assert shown[two].entry.score == scores[best] and f"t={best} b" in shown[two].entry.metric
    assert shown[two].entry.timesteps == "10, 20" and shown[two].entry.blocks == "b"
    every = table_rows(section_of(page, "all"))
    row = next(r for r in every if r[1] == two)
    assert row[0] == "correspond" and row[3:5] == ["10, 20", "b"] and row[7] == f"{scores[best]:.3f}"
    assert "upsample=input" in row[5] and run_id[:8] in row[2]

    # without boxes: n/a cells, and the headline on the image threshold
    nobox = shown["correspond-nobox.json"]
    image = {m["timestep"]: m["pck"]["overall"]["image"]["per_point"]["0.1"] for m in doc["maps"]}
    assert nobox.entry.score == max(image.values()) and "image threshold" in nobox.entry.metric
    block = part[part.index("correspond-nobox.json"):]
    assert [r[4:] for r in table_rows(block) if r[2:3] == ["bbox"]][:4] == [["n/a (no bbox)"] * 3] * 4
    # the variants are named on the page
    assert "the target image&#x27;s box in the dataset&#x27;s bbox target column" in part
