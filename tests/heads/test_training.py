"""Training heads from a synthetic store whose labels are a known function of the features."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from featurestore.store import FeatureStore, Run
from pipelines.analysis import results_dir
from pipelines.heads.logistic import split_rows
from pipelines.heads.modules import READS, load_head
from pipelines.heads.probe import ProbeConfig, probe_heads
from pipelines.heads.training import TrainConfig, Trainee, carve_validation
from pipelines.progress import set_quiet

N, CLASSES = 192, 4
SMALL = {"width": 16, "num_heads": 4, "hidden": 32, "expert_width": 8}
KINDS = ["linear", "mlp", "attention", "difformer", "uhead"]


def probe(run: Run, head: str, blocks: tuple[str, ...] | None = None, out: str | None = None, **kw) -> dict:
    """probe_heads with small heads, into the results folder `out` (default: the store's own);
    blocks default to a (single-map heads) or a and b."""
    train = TrainConfig(**{"epochs": 8, "batch_size": 16, "patience": 3, **kw.pop("train", {})})
    blocks = blocks or (("a",) if head in ("linear", "mlp", "attention") else ("a", "b"))
    cfg = ProbeConfig(head=head, blocks=list(blocks), timesteps=[5], lrs=kw.pop("lrs", [3e-3]), run_id=run.run_id,
                      head_options={**{k: v for k, v in SMALL.items() if k in READS[head]}, **kw.pop("head_options", {})},
                      train=train, **kw)
    return probe_heads(FeatureStore.open(run.store.url), cfg, results_dir(run.store.url, out))


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return np.random.default_rng(1).integers(0, CLASSES, N)


@pytest.fixture(scope="module")
def signal_run(tmp_path_factory, build_run, lit_channel, noise, labels) -> Run:
    """Block a: class k lights up channel k; block b: noise. Shared by the module's tests (only
    results folders are written next to it)."""
    rng = np.random.default_rng(2)
    features = {(5, "a"): lit_channel(rng, labels, (8, 8, 8)), (5, "b"): noise(rng, N, (6, 4, 4))}
    return build_run(tmp_path_factory.mktemp("signal") / "s.zarr", features, labels)


@pytest.fixture(scope="module")
def noise_run(tmp_path_factory, build_run, noise, labels) -> Run:
    rng = np.random.default_rng(3)
    features = {(5, "a"): noise(rng, N, (8, 8, 8)), (5, "b"): noise(rng, N, (6, 4, 4))}
    return build_run(tmp_path_factory.mktemp("noise") / "s.zarr", features, labels)


@pytest.mark.parametrize("head", KINDS)
def test_each_head_learns_a_separable_task(signal_run, head):
    doc = probe(signal_run, head)
    assert doc["top1"] >= 0.9, doc["heads"]


@pytest.mark.parametrize("head", KINDS)
def test_each_head_stays_near_chance_on_noise(noise_run, head):
    doc = probe(noise_run, head, train={"epochs": 6, "patience": 2})
    assert doc["top1"] < 0.45, doc["heads"]  # chance 0.25; 96 test images: 0.45 is > 4 standard deviations


def test_uhead_solves_a_task_only_the_expert_can_see(make_run, lit_channel, noise, labels, rng):
    run = make_run({(5, "a"): noise(rng, N, (8, 8, 8)), (5, "b"): noise(rng, N, (6, 4, 4))}, labels)
    expert = make_run({(None, "layer4"): lit_channel(rng, labels, (8, 2, 2))}, labels, name="resnet", chunk_rows=48)
    with_expert = probe(run, "uhead", expert_run=expert.run_id)
    without = probe(run, "uhead")
    assert with_expert["top1"] >= 0.9 and without["top1"] < 0.45, (with_expert["top1"], without["top1"])
    assert with_expert["heads"][0]["expert_keys"] == [[None, "layer4"]]


def test_a_grid_reads_each_chunk_once_per_epoch_and_equals_its_heads_trained_alone(signal_run, tmp_path,
                                                                                   chunk_reads):
    grid = probe(signal_run, "linear", blocks=("a", "b"), lrs=[3e-3, 1e-2], out=str(tmp_path / "grid"))
    head_names = [h["name"] for h in grid["heads"]]
    assert head_names == ["linear_t5_a_lr0.003", "linear_t5_a_lr0.01", "linear_t5_b_lr0.003", "linear_t5_b_lr0.01"]
    # every chunk: once per epoch (validation rides along) and once for the test pass; chunks that
    # hold validation rows once more, when the weights of the last epoch are scored
    train_rows, _ = split_rows(signal_run, "train", "test", None, 0)
    _, val_rows = carve_validation(train_rows, 0.1, 0)
    with_val = set((val_rows // signal_run.chunk_rows).tolist())
    reads = {c: grid["epochs_run"] + 1 + (c in with_val) for c in range(signal_run.n_chunks)}
    assert 0 < len(with_val) < signal_run.n_chunks
    assert chunk_reads == Counter({(signal_run.run_id, 5, b, c): n for b in ("a", "b") for c, n in reads.items()})

    alone = probe(signal_run, "linear", blocks=("b",), lrs=[1e-2], out=str(tmp_path / "alone"))
    # Bit-identical, not merely close: the head is seeded on its own, trains without randomness,
    # and sees the same batches in the same order, so the same float operations run in the same order.
    in_grid = next(h for h in grid["heads"] if h["name"] == "linear_t5_b_lr0.01")
    assert {k: in_grid[k] for k in ("top1", "top5", "per_class", "val_top1", "best_epoch", "epochs")} == \
           {k: alone["heads"][0][k] for k in ("top1", "top5", "per_class", "val_top1", "best_epoch", "epochs")}
    a, b = load_file(f"{grid['out']}/{in_grid['weights']}"), load_file(f"{alone['out']}/{alone['heads'][0]['weights']}")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_early_stopping_ends_when_validation_top1_stops_improving(signal_run):
    doc = probe(signal_run, "linear", lrs=[3e-2], train={"epochs": 40, "patience": 2})
    (head,) = doc["heads"]
    assert doc["epochs_run"] == head["epochs"] < 40
    # the best score, `patience` scores without a better one, and the last epoch's weights scored at the end
    assert head["epochs"] == head["best_epoch"] + 2 + 1 and head["val_top1"] == 1.0


@pytest.mark.parametrize("kind, epochs", [("mlp", 6), ("attention", 5)])
def test_the_reported_validation_score_is_that_of_the_saved_weights(make_run, lit_channel, rng, kind, epochs):
    """A head is saved with the weights its validation score was measured on: rescoring the saved
    head on the validation rows gives the reported number (a high learning rate makes the weights
    move a lot within an epoch, so a score taken mid-epoch would not match)."""
    labels = rng.integers(0, 7, N)
    run = make_run({(5, "a"): lit_channel(rng, labels, (8, 8, 8), 2.5)}, labels)
    doc = probe(run, kind, lrs=[3e-2, 1e-1], train={"epochs": epochs, "patience": 0, "batch_size": 8})
    train_rows, _ = split_rows(run, "train", "test", None, 0)
    _, val_rows = carve_validation(train_rows, 0.1, 0)
    features = {(5, "a"): torch.from_numpy(run.numpy(5, "a", val_rows))}
    for h in doc["heads"]:
        with torch.no_grad():
            predicted = load_head(f"{doc['out']}/{h['weights']}")(features).argmax(1).numpy()
        assert (predicted == labels[val_rows]).mean() == h["val_top1"], h["name"]


def test_each_epoch_record_scores_the_weights_after_that_epoch(make_run, lit_channel, rng, monkeypatch, capsys):
    """Validation of epoch e's weights happens during epoch e+1's pass; its record (and its line on
    stderr) must still hold the score of the weights after epoch e: rescoring a copy of the weights
    taken as each epoch ended gives every recorded val top-1 (a weak signal and a large validation
    split make the scores differ from epoch to epoch; one head stops early)."""
    set_quiet(False)  # a command run earlier in this process with --quiet leaves it on
    labels = rng.integers(0, 7, N)
    run = make_run({(5, "a"): lit_channel(rng, labels, (8, 8, 8), 0.5)}, labels)
    after: dict[str, list] = {}
    trained = Trainee.trained

    def snapshot(self, seconds):
        after.setdefault(self.name, []).append(copy.deepcopy(self.head).eval())
        trained(self, seconds)

    monkeypatch.setattr(Trainee, "trained", snapshot)
    doc = probe(run, "linear", lrs=[1e-3, 1e-1], train={"epochs": 6, "patience": 2, "val_fraction": 0.4})
    train_rows, _ = split_rows(run, "train", "test", None, 0)
    _, val_rows = carve_validation(train_rows, 0.4, 0)
    features = {(5, "a"): torch.from_numpy(run.numpy(5, "a", val_rows))}
    lines = capsys.readouterr().err.splitlines()
    assert any(h["epochs"] < 6 for h in doc["heads"])  # stopped early: its last epoch is scored by the last pass
    for h in doc["heads"]:
        records = h["epoch_log"]
        assert [r["epoch"] for r in records] == list(range(1, h["epochs"] + 1))
        with torch.no_grad():
            rescored = [float((head(features).argmax(1).numpy() == labels[val_rows]).mean()) for head in after[h["name"]]]
        assert len(set(rescored)) > 1 and [r["val_top1"] for r in records] == rescored, h["name"]
        assert records[h["best_epoch"] - 1]["val_top1"] == h["val_top1"] == max(rescored)
        assert all(r["train_loss"] > 0 and r["lr"] > 0 and r["seconds"] > 0 for r in records)
        mine = [line for line in lines if line.startswith(h["name"] + "  ")]
        assert mine == [f"{h['name']}  epoch {r['epoch']}/6  train loss {r['train_loss']:.4f}  val top-1 "
                        f"{r['val_top1']:.4f}  lr {r['lr']:.3g}  {r['seconds']:.2f} s" for r in records]


def numbers(doc: dict) -> dict:
    """The results without wall times (also those of each epoch record) and paths."""
    heads = [{**h, "epoch_log": [{k: v for k, v in r.items() if k != "seconds"} for r in h["epoch_log"]]}
             for h in doc["heads"]]
    return {k: v for k, v in doc.items() if k not in ("seconds_per_epoch", "read_seconds_per_epoch", "out", "config")} | {
        "heads": heads}


def test_the_same_seed_repeats_a_run_and_another_seed_does_not(signal_run, tmp_path):
    first = probe(signal_run, "mlp", train={"seed": 3, "epochs": 3}, out=str(tmp_path / "1"))
    again = probe(signal_run, "mlp", train={"seed": 3, "epochs": 3}, out=str(tmp_path / "2"))
    probe(signal_run, "mlp", train={"seed": 4, "epochs": 3}, out=str(tmp_path / "3"))
    assert numbers(first) == numbers(again)
    assert json.loads((tmp_path / "1" / Path(first["out"]).name / "results.json").read_text())["heads"] == first["heads"]
    name = first["heads"][0]["weights"]
    w1, w2, w3 = (load_file(next((tmp_path / d).glob("probe-mlp-*")) / name) for d in "123")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert not all(torch.equal(w1[k], w3[k]) for k in w1)


def test_saved_heads_reproduce_the_reported_test_accuracy(make_run, lit_channel, rng):
    labels = rng.integers(0, 7, N)  # 7 classes, so top-5 is not trivially 1
    run = make_run({(5, "a"): lit_channel(rng, labels, (8, 8, 8), 1.0), (5, "b"): lit_channel(rng, labels, (8, 4, 4), 1.0)}, labels)
    doc = probe(run, "difformer", lrs=[1e-3, 3e-3], train={"epochs": 3})
    out = str(Path(run.store.url).resolve()) + ".results/probe-difformer-" + run.run_id  # the default: the store's own
    assert doc["out"].startswith(out) and doc["run_id"] == run.run_id
    assert {"top1", "top5", "config", "run_id", "seconds_per_epoch", "heads"} <= doc.keys()
    assert doc["seconds_per_epoch"] > 0 and doc["config"]["head"] == "difformer"
    _, test_rows = split_rows(run, "train", "test", None, 0)
    features = {k: torch.from_numpy(run.numpy(*k, test_rows)) for k in [(5, "a"), (5, "b")]}
    for h in doc["heads"]:
        assert {"top1", "top5", "per_class"} <= h.keys() and h["top1"] <= h["top5"]
        assert set(h["per_class"]) == {f"c{k}" for k in np.unique(labels[test_rows])}
        head = load_head(f"{doc['out']}/{h['weights']}")
        with torch.no_grad():
            predicted = head(features).argmax(1).numpy()
        assert (predicted == labels[test_rows]).mean() == h["top1"]
        per_class = {f"c{k}": (predicted[labels[test_rows] == k] == k).mean() for k in np.unique(labels[test_rows])}
        assert per_class == pytest.approx(h["per_class"])


def write_text(path, classes: list[str], rng) -> str:
    save_file({"embeddings": torch.tensor(rng.normal(size=(len(classes), 16)), dtype=torch.float32)}, str(path),
              metadata={"classes": json.dumps(classes)})
    return str(path)


def test_cosine_classifier_learns_and_refuses_other_classes(signal_run, tmp_path, rng):
    text = write_text(tmp_path / "text.safetensors", [f"c{k}" for k in range(CLASSES)], rng)
    doc = probe(signal_run, "attention", classifier="cosine", text_embeddings=text)
    assert doc["top1"] >= 0.9 and doc["heads"][0]["spec"]["text_dim"] == 16
    swapped = write_text(tmp_path / "swapped.safetensors", ["c1", "c0", "c2", "c3"], rng)
    with pytest.raises(ValueError, match=r"do not match the run's .*label 0: \['c1'\] vs \['c0'\]"):
        probe(signal_run, "attention", classifier="cosine", text_embeddings=swapped)
    with pytest.raises(ValueError, match="needs text embeddings"):
        probe(signal_run, "linear", classifier="cosine")
    save_file({"embeddings": torch.zeros(CLASSES, 16)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match="no 'classes' metadata"):
        probe(signal_run, "linear", classifier="cosine", text_embeddings=str(tmp_path / "bare.safetensors"))


@pytest.mark.parametrize(("kw", "message"), [
    ({"head": "linear", "blocks": ("nope",)}, "no block 'nope'"),
    ({"head": "difformer", "blocks": ("a",)}, "at least two --block"),
    ({"head": "attention", "expert_run": "0123"}, "uhead only"),
    ({"head": "uhead", "expert_run": "0123"}, "no run '0123'"),
    ({"head": "linear", "train": {"device": "nope"}}, "--device 'nope' is not a torch device"),
    pytest.param({"head": "linear", "train": {"device": "cuda"}}, "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_input_is_refused_with_a_clear_message(signal_run, kw, message):
    with pytest.raises(ValueError, match=message):
        probe(signal_run, **kw)
