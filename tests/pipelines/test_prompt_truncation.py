"""Prompts longer than the text encoder's context are counted, warned about in one line and
recorded in the run's provenance, instead of being cut silently."""

import csv
import json

from typer.testing import CliRunner

from cli.main import app
from featurestore.store import FeatureStore
from pipelines.extract.backbone import create_backbone


def test_prompts_cut_to_the_context_are_counted_warned_and_recorded(tmp_path, tiny_sd):
    # the tiny tokenizer has "cat" as one token; with the start and end tokens, 75 words fill CLIP's 77
    prompts = ["cat " * 75, "cat " * 76, "a photo of a cat", "a photo of the dog " * 30]
    with open(tmp_path / "prompts.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "prompt"])
        writer.writerows([f"mnist-demo.npz#{i}", p] for i, p in enumerate(prompts))
    (tmp_path / "sd.json").write_text(json.dumps({"image_size": 64}))
    store = tmp_path / "s.zarr"
    result = CliRunner().invoke(app, [
        "extract", "--dataset", "demo", "--limit", "4", "--backbone", "sd15", "--weights", str(tiny_sd),
        "--backbone-config", str(tmp_path / "sd.json"), "--store", str(store), "--prompt",
        f"file:{tmp_path / 'prompts.csv'}", "--timesteps", "200", "--blocks", "down0", "--json"])
    assert result.exit_code == 0, result.output
    # (transformers' own loading bars go to stderr too)
    assert [line for line in result.stderr.splitlines() if "prompt" in line or "token" in line.lower()] == [
        "warning: 2 of 4 prompts are longer than sd15's 77-token context and are cut to it "
        "(recorded in the run's provenance)"]
    (run,) = FeatureStore.open(str(store)).runs()
    assert run.provenance["prompts"] == {"context_tokens": 77, "truncated": 2}

    tokenizer = create_backbone("sd15", tiny_sd).tokenizer
    assert [len(ids) for ids in tokenizer(prompts[:2]).input_ids] == [77, 78]
