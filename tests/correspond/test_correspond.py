"""`featurestore correspond` on stores: every map's PCK against an independent DIFT evaluation written
here (torch's nn.Upsample to the original size, F.normalize, argmax, as eval_spair.py), PCK computed
from the saved matches CSV by a separate implementation, one-line refusals, and an --ensemble run
extracted from a warps set (the `#warp=` images go through the reader)."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

import pipelines.extract.runner as runner
from cli.main import app
from data_manifests.pairs import warps
from featurestore.store import FeatureStore
from featurestore.targets import RowTargets, write_pairs, write_targets
from pipelines.extract.runner import ExtractConfig, extract

S = 16  # input size
N = 10
BLOCKS = {"a": (5, 4, 4), "b": (3, 8, 8)}
TIMESTEPS = [10, 20]
ALPHAS = ("0.05", "0.1", "0.15")
PAIRS = [(0, 1, "cat"), (2, 3, "cat"), (4, 5, "dog"), (6, 7, "dog"), (8, 9, "dog"), (1, 0, "cat"), (3, 8, "dog")]


def toy_data():
    """Images of assorted sizes squashed to S x S, 6 keypoints each (some invisible), boxes, random maps."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(20, 60, (N, 2))
    keypoints = np.zeros((N, 6, 3), np.float32)
    for i, (w, h) in enumerate(sizes):
        keypoints[i, :, 0] = rng.uniform(0, w, 6)
        keypoints[i, :, 1] = rng.uniform(0, h, 6)
        keypoints[i, :, 2] = rng.random(6) < 0.8
    boxes = np.column_stack([sizes * 0.1, sizes * rng.uniform(0.5, 0.9, (N, 2))]).astype(np.float32)
    features = {(t, b): rng.standard_normal((N, *shape)).astype(np.float32) for t in TIMESTEPS for b, shape in BLOCKS.items()}
    return sizes, keypoints, boxes, features


def build_toy(path: Path, features: dict, spec: dict | None = None, no_box: tuple[int, ...] = (),
              blocks: dict = BLOCKS) -> tuple[str, dict]:
    """The toy images, keypoints and pairs in a store at `path` with these `features` ((N, C, H, W),
    or (N, K, C, H, W) with spec noise_draws K); the images in `no_box` get no bbox."""
    sizes, keypoints, boxes, _ = toy_data()
    store = FeatureStore.open(str(path), mode="a")
    ids = [f"img{i}" for i in range(N)]
    rows = store.add_images("toypairs", {"id": ids, "label": [0] * N, "class_name": ["x"] * N, "split": ["test"] * N,
                                         "domain": ["photo"] * N, "source": ids})
    run = store.create_run({"dataset": "toypairs", "name": "correspond", "resize": "squash", **(spec or {})},
                           arrays=blocks, timesteps=TIMESTEPS, rows=rows, chunk_rows=4, dtype="float32",
                           provenance={"backbone": {"input": {"size": S}}})
    for c in range(run.n_chunks):
        s = run.chunk_slice(c)
        run.write_chunk(c, {key: f[s] for key, f in features.items()}, np.zeros(s.stop - s.start, bool),
                        [""] * (s.stop - s.start))
    info = {"keypoints": {"names": None}, "bbox": {}}
    write_targets(store, "toypairs", rows, resize="squash", size=S, info=info, load=lambda k: RowTargets(
        tuple(sizes[k]), np.array([S / sizes[k][0], 0.0, S / sizes[k][1], 0.0]), keypoints=keypoints[k],
        bbox=None if k in no_box else boxes[k]))
    write_pairs(store, "toypairs", [(rows[s], rows[t], c, "test") for s, t, c in PAIRS])
    return str(path), {"sizes": sizes, "keypoints": keypoints, "boxes": boxes, "features": features}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return build_toy(tmp_path_factory.mktemp("correspond") / "s.zarr", toy_data()[3])


def dift_matches(data, t, block):
    """Per pair: (category, [(kp, true xy, predicted xy)]) by DIFT's eval_spair.py steps, written
    with torch: the maps upsampled to each image's (h, w), the source vector at the keypoint's
    pixel (continuous coordinates: pixel = floor), target pixels normalised, argmax, pixel centre."""
    out = []
    for s, t_, category in PAIRS:
        fs, ft = (torch.from_numpy(data["features"][(t, block)][i])[None] for i in (s, t_))
        (ws, hs), (wt, ht) = data["sizes"][s], data["sizes"][t_]
        up_t = F.interpolate(ft, size=(int(ht), int(wt)), mode="bilinear", align_corners=False)[0]
        trg = F.normalize(up_t.reshape(up_t.shape[0], -1), dim=0)
        found = []
        for k in range(6):
            (xs, ys, vs), (xt, yt, vt) = data["keypoints"][s, k], data["keypoints"][t_, k]
            if not (vs and vt):
                continue
            # the toy keypoints are not pixel centres: sample the source map bilinearly at the point instead
            grid = torch.tensor([[[[xs / ws * 2 - 1, ys / hs * 2 - 1]]]], dtype=torch.float32)
            vec = F.grid_sample(fs, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0, 0]
            flat = int((F.normalize(vec, dim=0) @ trg).argmax())
            found.append((k, (xt, yt), (flat % int(wt) + 0.5, flat // int(wt) + 0.5)))
        out.append((category, found))
    return out


def pck_of(pairs, data_targets, alpha, threshold):
    """(per image, per point, per category {cat: (per image, per point)}) from [(category, target
    index, [(kp, true, pred)])] with sides from the target's bbox or image size."""
    per_pair, per_cat, points = [], defaultdict(list), []
    for category, side, found in ((c, s, f) for c, s, f in pairs):
        correct = [np.hypot(p[0] - q[0], p[1] - q[1]) <= alpha * side for _, q, p in found]
        per_pair.append(np.mean(correct))
        per_cat[category].append(correct)
        points += correct
    cats = {c: (np.mean([np.mean(x) for x in v]), np.mean(sum(v, []))) for c, v in per_cat.items()}
    return np.mean(per_pair), np.mean(points), cats


def sides(data, target, threshold):
    if threshold == "bbox":
        x0, y0, x1, y1 = data["boxes"][target]
        return max(x1 - x0, y1 - y0)
    return max(data["sizes"][target])


def invoke(*args):
    return CliRunner().invoke(app, ["correspond", *map(str, args)])


def test_every_map_of_a_grid_is_difts_pck(toy, tmp_path):
    path, data = toy
    result = invoke(path, "--out", tmp_path, "--json", "--quiet")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [(m["timestep"], m["block"]) for m in doc["maps"]] == [(t, b) for t in TIMESTEPS for b in BLOCKS]
    assert doc["geometry"] == "squash-16" and doc["upsample"] == "input" and "DIFT" in doc["method"]
    assert set(doc["variants"]) == {"thresholds", "averages", "correct"}
    assert doc["pairs"]["scored"] == len(PAIRS)
    for m in doc["maps"]:
        matched = dift_matches(data, m["timestep"], m["block"])
        for threshold in ("bbox", "image"):
            scored = [(c, sides(data, PAIRS[k][1], threshold), f) for k, (c, f) in enumerate(matched)]
            for alpha in ALPHAS:
                per_image, per_point, cats = pck_of(scored, data, float(alpha), threshold)
                got = m["pck"]["overall"][threshold]
                assert got["per_image"][alpha] == pytest.approx(per_image)
                assert got["per_point"][alpha] == pytest.approx(per_point)
                for c, (ci, cp) in cats.items():
                    assert m["pck"]["per_category"][c][threshold]["per_image"][alpha] == pytest.approx(ci)
                    assert m["pck"]["per_category"][c][threshold]["per_point"][alpha] == pytest.approx(cp)
    values = [m["pck"]["overall"]["image"]["per_point"]["0.15"] for m in doc["maps"]]
    assert 0 < max(values) and max(values) < 1  # not degenerate
    saved = list(tmp_path.glob("correspond-*.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text())["maps"] == doc["maps"]
    assert Path(doc["out"]).resolve() == saved[0].resolve()  # --json says where the file went
    assert json.loads(saved[0].read_text())["out"] == doc["out"]


def test_pck_from_the_saved_matches_equals_the_commands(toy, tmp_path):
    """An independent PCK from the CSV alone: per image = mean over pairs, per point = pooled."""
    path, data = toy
    matches = tmp_path / "m.csv"
    result = invoke(path, "--block", "b", "--timestep", "20", "--save-matches", matches, "--out", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)["maps"][0]["pck"]
    with open(matches, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["pair", "category", "kp", "src_x", "src_y", "true_x", "true_y", "pred_x",
                                     "pred_y", "bbox_w", "bbox_h", "img_w", "img_h"]
        rows = list(reader)
    for row in rows:  # the CSV holds the stored targets, in original target pixels
        s, t, _ = PAIRS[int(row["pair"])]
        assert float(row["true_x"]) == pytest.approx(data["keypoints"][t, int(row["kp"]), 0])
        assert float(row["src_y"]) == pytest.approx(data["keypoints"][s, int(row["kp"]), 1])
        assert float(row["img_w"]) == data["sizes"][t][0]
    for threshold, (wcol, hcol) in (("bbox", ("bbox_w", "bbox_h")), ("image", ("img_w", "img_h"))):
        for alpha in ALPHAS:
            by_pair, by_cat, pooled = defaultdict(list), defaultdict(lambda: defaultdict(list)), []
            for row in rows:
                d = ((float(row["pred_x"]) - float(row["true_x"])) ** 2
                     + (float(row["pred_y"]) - float(row["true_y"])) ** 2) ** 0.5
                ok = d <= float(alpha) * max(float(row[wcol]), float(row[hcol]))
                by_pair[row["pair"]].append(ok)
                by_cat[row["category"]][row["pair"]].append(ok)
                pooled.append(ok)
            assert doc["overall"][threshold]["per_image"][alpha] == pytest.approx(
                sum(sum(v) / len(v) for v in by_pair.values()) / len(by_pair))
            assert doc["overall"][threshold]["per_point"][alpha] == pytest.approx(sum(pooled) / len(pooled))
            for c, pairs in by_cat.items():
                assert doc["per_category"][c][threshold]["per_image"][alpha] == pytest.approx(
                    sum(sum(v) / len(v) for v in pairs.values()) / len(pairs))
    again = invoke(path, "--block", "b", "--timestep", "20", "--save-matches", matches, "--out", tmp_path)
    assert again.exit_code == 1 and "never overwrites" in again.output and again.output.count("\n") == 1


def test_feature_resolution_soft_argmax_names_its_settings(toy, tmp_path):
    path, _ = toy
    result = invoke(path, "--block", "a", "--timesteps", "10", "--upsample", "feature", "--soft-radius", "2",
                    "--out", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert "R = 2 cells, T = 0.05" in doc["method"] and doc["settings"]["soft_radius"] == 2
    text = invoke(path, "--block", "a", "--timesteps", "10", "--upsample", "feature", "--soft-radius", "2",
                  "--out", tmp_path)
    assert text.exit_code == 0, text.output
    assert "upsample feature (soft-argmax window R = 2 cells, temperature T = 0.05)" in text.output.splitlines()[0]
    # the input variant's results file is another file: settings are in the digest
    assert invoke(path, "--block", "a", "--timesteps", "10", "--out", tmp_path).exit_code == 0
    assert len(list(tmp_path.glob("correspond-*.json"))) == 2


@pytest.mark.parametrize(("args", "message"), [
    (["--save-matches", "x.csv"], "--save-matches writes the matches of one map"),
    (["--block", "a,b", "--timestep", "10", "--save-matches", "x.csv"], "one map"),
    (["--soft-radius", "2"], "refine --upsample feature only"),
    (["--upsample", "feature", "--soft-temperature", "0"], "--soft-temperature positive"),
    (["--upsample", "pixel"], "--upsample must be one of input, feature"),
    (["--block", "zzz"], "has no block 'zzz'"),
    (["--alpha", "0.1,x"], "--alpha takes numbers"),
    (["--alpha", "0"], "--alpha takes finite positive numbers"),
    (["--alpha", "0.1,nan"], "--alpha takes finite positive numbers"),
    (["--alpha", "inf"], "--alpha takes finite positive numbers"),
    (["--alpha", "-0.1"], "--alpha takes finite positive numbers"),
    (["--bbox-of", "both"], "--bbox-of must be one of target, source"),
    (["--draws", "all"], "--draws all has no meaning for correspondence"),
    (["--draws", "1"], "holds 1 noise draw per image"),
    (["--draws", "x"], "draw"),
    (["--split", "train"], "no image pairs of split 'train'"),
])
def test_bad_options_are_refused_in_one_line(toy, tmp_path, args, message):
    result = invoke(toy[0], *args, "--out", tmp_path)
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert message in result.output


def test_an_ensemble_run_of_a_warps_set_through_extract(tmp_path, monkeypatch):
    """Warped images are made by the image loader during extraction; the matches on the ensemble's
    mean maps are scored like any other (and mean-of-2 maps differ from one draw)."""
    rng = np.random.default_rng(1)
    for cls in ("a", "b"):
        for i in range(2):
            (tmp_path / "photos" / cls).mkdir(parents=True, exist_ok=True)
            y, x = np.mgrid[0:28, 0:28]
            Image.fromarray((127 + 100 * np.sin(x / 4 + rng.uniform(0, 6)) * np.cos(y / 5)).astype(np.uint8)).save(
                tmp_path / "photos" / cls / f"{i}.png")
    manifest = warps(tmp_path, "warps-toy", folder="photos", per_class=2, grid=3)
    monkeypatch.setattr(runner, "_load_manifest", lambda cfg: manifest)
    cfg = ExtractConfig(store=str(tmp_path / "s.zarr"), backbone="ddpm-mnist", manifest=tmp_path / "unused.csv",
                        timesteps=[50], blocks=["block3"], progress=False, chunk_rows=4, ensemble=2)
    run_id = extract(cfg).run_id
    result = invoke(tmp_path / "s.zarr", "--run", run_id, "--json", "--out", tmp_path,
                    "--save-matches", tmp_path / "m.csv", "--block", "block3", "--timestep", "50")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["pairs"]["scored"] == 4 and doc["geometry"] == "crop-28"
    with open(tmp_path / "m.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == doc["points"]["scored"] and {r["category"] for r in rows} == {"a", "b"}
    assert FeatureStore.open(str(tmp_path / "s.zarr")).run(run_id).spec["ensemble"] == 2


def test_source_points_cropped_off_are_counted_not_scored(tmp_path):
    """40 x 20 images centre-cropped to 16 x 16 (scale 0.8, 8 px cut on the left and right): a source
    point at x < 10 or x > 30 has no feature. Pair 0 keeps 2 of its 3 points, pair 1 none."""
    store = FeatureStore.open(str(tmp_path / "s.zarr"), mode="a")
    ids = ["p", "q", "r"]
    rows = store.add_images("crop", {"id": ids, "label": [0] * 3, "class_name": ["x"] * 3, "split": ["test"] * 3,
                                     "domain": ["photo"] * 3, "source": ids})
    run = store.create_run({"dataset": "crop"}, arrays={"m": (2, 4, 4)}, timesteps=[None], rows=rows, chunk_rows=4,
                           dtype="float32", provenance={"backbone": {"input": {"size": S}}})
    run.write_chunk(0, {(None, "m"): np.random.default_rng(0).standard_normal((3, 2, 4, 4)).astype(np.float32)},
                    np.zeros(3, bool), [""] * 3)
    points = {0: [[20, 10, 1], [5, 10, 1], [29, 5, 1]], 1: [[12, 3, 1], [35, 8, 1], [30, 9, 1]],
              2: [[2, 2, 1], [39, 1, 1], [1, 19, 1]]}
    write_targets(store, "crop", rows, resize="crop", size=S, info={"keypoints": {"names": None}}, load=lambda k:
                  RowTargets((40, 20), np.array([0.8, -8.0, 0.8, 0.0]), keypoints=np.array(points[k], np.float32)))
    write_pairs(store, "crop", [(rows[0], rows[1], "x", "test"), (rows[2], rows[1], "x", "test")])
    matches = tmp_path / "m.csv"
    result = invoke(tmp_path / "s.zarr", "--json", "--out", tmp_path, "--save-matches", matches, "--block", "m",
                    "--timestep", "none")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["pairs"] == {"listed": 2, "scored": 1, "image_unusable": 0, "no_common_point": 1}
    assert doc["points"] == {"scored": 2, "outside_source_input": 4, "outside_target_input": 0}
    assert doc["maps"][0]["pck"]["overall"]["bbox"] is None  # no boxes: that threshold is undefined
    with open(matches, newline="") as f:
        rows_ = list(csv.DictReader(f))
    assert [int(r["kp"]) for r in rows_] == [0, 2] and all(r["bbox_w"] == "" for r in rows_)
    # predictions lie inside the crop, original x in [10, 30]
    assert all(10 <= float(r["pred_x"]) <= 30 for r in rows_)
    # the text table names the expert timestep as --timestep takes it
    text = invoke(tmp_path / "s.zarr", "--out", tmp_path, "--block", "m", "--timestep", "none")
    assert text.exit_code == 0, text.output
    table = [line for line in text.output.splitlines() if line.startswith("| none | m |")]
    assert len(table) == 4 and "None" not in text.output
    assert table[0].startswith("| none | m | bbox | per_image | n/a (no bbox)")


def crop_store(path: Path, points: dict[int, list], pairs: list[tuple[int, int]]) -> str:
    """40 x 20 images centre-cropped to S x S (geometry [0.8, -8, 0.8, 0]: original x in [10, 30] is
    inside the input), a random (2, 4, 4) map "m" at t = none, these keypoints and pairs."""
    store = FeatureStore.open(str(path), mode="a")
    ids = [f"i{k}" for k in range(len(points))]
    rows = store.add_images("crop", {"id": ids, "label": [0] * len(ids), "class_name": ["x"] * len(ids),
                                     "split": ["test"] * len(ids), "domain": ["photo"] * len(ids), "source": ids})
    run = store.create_run({"dataset": "crop"}, arrays={"m": (2, 4, 4)}, timesteps=[None], rows=rows, chunk_rows=4,
                           dtype="float32", provenance={"backbone": {"input": {"size": S}}})
    run.write_chunk(0, {(None, "m"): np.random.default_rng(0).standard_normal((len(ids), 2, 4, 4)).astype(np.float32)},
                    np.zeros(len(ids), bool), [""] * len(ids))
    write_targets(store, "crop", rows, resize="crop", size=S, info={"keypoints": {"names": None}}, load=lambda k:
                  RowTargets((40, 20), np.array([0.8, -8.0, 0.8, 0.0]), keypoints=np.array(points[k], np.float32)))
    write_pairs(store, "crop", [(rows[a], rows[b], "x", "test") for a, b in pairs])
    return str(path)


def test_target_points_cropped_off_are_counted_not_scored(tmp_path):
    """Pair 0 (i0 -> i1): every source point is inside the crop, target points 1 (x = 35) and 2 (x = 5)
    are not, so only keypoint 0 is scored. Pair 1 (i1 -> i0): source points 1 and 2 are outside
    (counted as source points, not again as target points); keypoint 0 is scored."""
    points = {0: [[20, 10, 1], [15, 5, 1], [25, 12, 1]], 1: [[12, 3, 1], [35, 8, 1], [5, 9, 1]]}
    path = crop_store(tmp_path / "s.zarr", points, [(0, 1), (1, 0)])
    matches = tmp_path / "m.csv"
    result = invoke(path, "--json", "--out", tmp_path, "--save-matches", matches, "--block", "m", "--timestep", "none")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["points"] == {"scored": 2, "outside_source_input": 2, "outside_target_input": 2}
    assert doc["pairs"]["scored"] == 2 and doc["maps"][0]["pck"]["overall"]["points"] == 2
    with open(matches, newline="") as f:
        assert [(r["pair"], r["kp"]) for r in csv.DictReader(f)] == [("0", "0"), ("1", "0")]
    text = invoke(path, "--out", tmp_path, "--block", "m", "--timestep", "none")
    assert "2 target points outside the input (no candidate pixel reaches them)" in text.output


def test_bbox_threshold_of_the_source_box(toy, tmp_path):
    """--bbox-of source: alpha times the source image's box side (NCNet's PF reference length is an
    image's keypoint extent); the image threshold is unchanged, the output names the choice."""
    path, data = toy
    result = invoke(path, "--block", "b", "--timestep", "20", "--bbox-of", "source", "--out", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["bbox_of"] == "source" and doc["settings"]["bbox_of"] == "source"
    assert "source image's box" in doc["variants"]["thresholds"]["bbox"]
    matched = dift_matches(data, 20, "b")
    scored = [(c, sides(data, PAIRS[k][0], "bbox"), f) for k, (c, f) in enumerate(matched)]
    target = [(c, sides(data, PAIRS[k][1], "bbox"), f) for k, (c, f) in enumerate(matched)]
    got = doc["maps"][0]["pck"]["overall"]["bbox"]
    for alpha in ALPHAS:
        per_image, per_point, cats = pck_of(scored, data, float(alpha), "bbox")
        assert got["per_image"][alpha] == pytest.approx(per_image)
        assert got["per_point"][alpha] == pytest.approx(per_point)
        for c, (ci, _) in cats.items():
            assert doc["maps"][0]["pck"]["per_category"][c]["bbox"]["per_image"][alpha] == pytest.approx(ci)
    # the two choices differ on this toy (else the test could not tell them apart)
    assert any(pck_of(scored, data, float(a), "bbox")[1] != pck_of(target, data, float(a), "bbox")[1] for a in ALPHAS)
    text = invoke(path, "--block", "b", "--timestep", "20", "--bbox-of", "source", "--out", tmp_path)
    assert "bbox threshold from the source's box" in text.output.splitlines()[0]


def test_an_image_without_a_box_blanks_only_its_pairs(tmp_path):
    """Image 5 has no box: the bbox PCK of its pair's category (dog) and the overall one are
    undefined; the cat pairs' bbox PCK is DIFT's; the image threshold is everywhere defined."""
    path, data = build_toy(tmp_path / "s.zarr", toy_data()[3], no_box=(5,))
    result = invoke(path, "--block", "a", "--timestep", "10", "--out", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)["maps"][0]["pck"]
    assert got["overall"]["bbox"] is None and got["per_category"]["dog"]["bbox"] is None
    assert got["overall"]["image"] is not None and got["per_category"]["dog"]["image"] is not None
    matched = dift_matches(data, 10, "a")
    cats = [(c, sides(data, PAIRS[k][1], "bbox"), f) for k, (c, f) in enumerate(matched) if c == "cat"]
    for alpha in ALPHAS:
        per_image, per_point, _ = pck_of(cats, data, float(alpha), "bbox")
        assert got["per_category"]["cat"]["bbox"]["per_image"][alpha] == pytest.approx(per_image)
        assert got["per_category"]["cat"]["bbox"]["per_point"][alpha] == pytest.approx(per_point)


def test_noise_draws_mean_or_one_draw(tmp_path):
    """A run of 2 noise draws: --draws mean scores DIFT's matches on the float32 mean of the draws,
    --draws 1 on draw 1 alone; the choice is recorded and printed."""
    rng = np.random.default_rng(5)
    stored = {(t, b): rng.standard_normal((N, 2, *shape)).astype(np.float32) for t in TIMESTEPS
              for b, shape in BLOCKS.items()}
    path, data = build_toy(tmp_path / "s.zarr", stored, spec={"noise_draws": 2})
    for draws, features in (("mean", {k: (v[:, 0] + v[:, 1]) / np.float32(2) for k, v in stored.items()}),
                            ("1", {k: v[:, 1] for k, v in stored.items()})):
        result = invoke(path, "--block", "b", "--timestep", "10", "--draws", draws, "--out", tmp_path, "--json")
        assert result.exit_code == 0, result.output
        doc = json.loads(result.stdout)
        assert doc["settings"]["draws"] == (draws if draws == "mean" else 1)
        matched = dift_matches({**data, "features": features}, 10, "b")
        scored = [(c, sides(data, PAIRS[k][1], "image"), f) for k, (c, f) in enumerate(matched)]
        for alpha in ALPHAS:
            per_image, per_point, _ = pck_of(scored, data, float(alpha), "image")
            assert doc["maps"][0]["pck"]["overall"]["image"]["per_image"][alpha] == pytest.approx(per_image)
            assert doc["maps"][0]["pck"]["overall"]["image"]["per_point"][alpha] == pytest.approx(per_point)
    text = invoke(path, "--block", "b", "--timestep", "10", "--out", tmp_path)
    assert "noise draws: mean (float32 mean over the 2 draws of each image)" in text.output
    assert len(list(tmp_path.glob("correspond-*.json"))) == 2  # the draw is in the results file's digest


def test_attention_maps_are_scored_only_when_named(tmp_path):
    """Without --blocks a run's `<block>.attn` cross-attention maps are not scored (Run.feature_blocks)."""
    blocks = {**BLOCKS, "a.attn": (7, 4, 4)}
    rng = np.random.default_rng(2)
    features = {(t, b): rng.standard_normal((N, *shape)).astype(np.float32) for t in TIMESTEPS
                for b, shape in blocks.items()}
    path, _ = build_toy(tmp_path / "s.zarr", features, blocks=blocks)
    result = invoke(path, "--timestep", "10", "--out", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    assert [m["block"] for m in json.loads(result.stdout)["maps"]] == ["a", "b"]
    named = invoke(path, "--timestep", "10", "--block", "a.attn", "--out", tmp_path, "--json")
    assert named.exit_code == 0 and [m["block"] for m in json.loads(named.stdout)["maps"]] == ["a.attn"]


def soft_argmax_points(data, t, block, radius, temperature):
    """Per pair [(kp, true xy, predicted xy)] at feature resolution, written with torch: the source
    vector grid-sampled at the keypoint, cosine with every normalised cell of the target map, the
    softmax(cos / T) weighted mean of the cell centres within `radius` cells (Chebyshev) of the best
    cell, scaled from the H x W map to the S x S input and back to the w x h image (squash)."""
    out = []
    for s, t_, category in PAIRS:
        fs, ft = (torch.from_numpy(data["features"][(t, block)][i]).double() for i in (s, t_))
        (ws, hs), (wt, ht) = data["sizes"][s], data["sizes"][t_]
        c, h, w = ft.shape
        cells = F.normalize(ft.reshape(c, -1), dim=0)
        found = []
        for k in range(6):
            (xs, ys, vs), (xt, yt, vt) = data["keypoints"][s, k], data["keypoints"][t_, k]
            if not (vs and vt):
                continue
            grid = torch.tensor([[[[xs / ws * 2 - 1, ys / hs * 2 - 1]]]], dtype=torch.float64)
            vec = F.grid_sample(fs[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0, 0]
            cos = (F.normalize(vec, dim=0) @ cells).reshape(h, w)
            best = int(cos.argmax())
            bi, bj = divmod(best, w)
            ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            near = ((ii - bi).abs() <= radius) & ((jj - bj).abs() <= radius)
            weight = torch.softmax(cos[near] / temperature, dim=0)
            x_feat, y_feat = (weight * (jj[near] + 0.5)).sum(), (weight * (ii[near] + 0.5)).sum()
            found.append((k, (xt, yt), (float(x_feat / w * wt), float(y_feat / h * ht))))
        out.append((category, found))
    return out


def test_feature_resolution_pck_is_an_independent_soft_argmax(toy, tmp_path):
    """--upsample feature end to end: every saved prediction and the PCK equal the soft-argmax
    written above (R = 2 cells, T = 0.1)."""
    path, data = toy
    matches = tmp_path / "m.csv"
    result = invoke(path, "--block", "b", "--timestep", "20", "--upsample", "feature", "--soft-radius", "2",
                    "--soft-temperature", "0.1", "--save-matches", matches, "--out", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    expected = soft_argmax_points(data, 20, "b", 2, 0.1)
    with open(matches, newline="") as f:
        rows = list(csv.DictReader(f))
    flat = [(k, found) for k, (_, pair) in enumerate(expected) for found in pair]
    assert len(rows) == len(flat)
    for row, (pair, (kp, _, (px, py))) in zip(rows, flat):
        assert (int(row["pair"]), int(row["kp"])) == (pair, kp)
        assert (float(row["pred_x"]), float(row["pred_y"])) == pytest.approx((px, py), abs=1e-4)
    for threshold in ("bbox", "image"):
        scored = [(c, sides(data, PAIRS[k][1], threshold), f) for k, (c, f) in enumerate(expected)]
        for alpha in ALPHAS:
            per_image, per_point, _ = pck_of(scored, data, float(alpha), threshold)
            got = doc["maps"][0]["pck"]["overall"][threshold]
            assert got["per_image"][alpha] == pytest.approx(per_image)
            assert got["per_point"][alpha] == pytest.approx(per_point)
