"""Zero-shot segmentation from cached cross-attention maps: nothing is trained.

A run extracted with `--attention-maps` (sd15) stores `<block>.attn`, (77, h, w) per image: for each
prompt token, the block's cross-attention probability at each position, averaged over the block's
attention layers and heads. Each class is named by the positions of its name's tokens in the
prompt (`class_tokens`, in class order; the same for every image, so the prompt must be the same
for every image: `--prompt fixed:TEXT` listing the class names, e.g. "background zero one ...",
where position 0 is the start token). Each pixel is labelled with the class whose token has the
highest map value there: token maps are upsampled bilinearly (align_corners=False) to the stored
masks' S x S, a class scores the maximum over its tokens, and the pixel takes the argmax over
classes (the DAAM / attention-map baseline). Scored on the test split exactly like `segment`, on
the S x S input grid (`metrics.grid_variant`). On a run of several noise draws, `draws` reads the
mean of each image's draws or draw k ("all" is refused: nothing is trained).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from featurestore.store import FeatureStore, parse_draws, timestep_key
from pipelines.analysis import draws_meaning, results_path, run_images, single_draw_dropped, write_json
from pipelines.dense.metrics import (
    class_pixel_counts, confusion_matrix, grid_variant, majority_baseline, segmentation_scores,
)
from pipelines.dense.train import TargetReader
from pipelines.heads.data import StoreBatches
from pipelines.heads.logistic import resolve_run, split_rows
from pipelines.heads.modules import resized
from pipelines.progress import bar

RULE = ("each pixel: the class whose name token has the highest cross-attention value there (token maps upsampled "
        "bilinearly to the mask size; a class of several tokens scores their maximum)")


def parse_class_tokens(text: str) -> list[list[int]]:
    """`1,2,3+4` -> [[1], [2], [3, 4]]: the prompt positions of each class's tokens, in class order."""
    try:
        out = [[int(p) for p in item.split("+")] for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"--class-tokens takes token positions per class, comma-separated ('+' joins the tokens "
                         f"of one class), got {text!r}") from None
    if not out:
        raise ValueError("--class-tokens is empty")
    return out


def attention_labels(maps: np.ndarray, class_tokens: Sequence[Sequence[int]], size: int) -> np.ndarray:
    """(B, S, S) int64 class indices from (B, tokens, h, w) cross-attention maps (RULE)."""
    x = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))
    positions = sorted({p for tokens in class_tokens for p in tokens})
    up = resized(x[:, positions], (size, size))
    where = {p: i for i, p in enumerate(positions)}
    scores = torch.stack([up[:, [where[p] for p in tokens]].amax(dim=1) for tokens in class_tokens], dim=1)
    return scores.argmax(dim=1).numpy()


def attention_zero_shot(store: FeatureStore, run_id: str | None, timestep: int | None, block: str,
                        class_tokens: Sequence[Sequence[int]], results: Path, train_split: str = "train",
                        test_split: str = "test", holdout: float | None = None, seed: int = 0,
                        allow_incomplete: bool = False, draws: str | int = "mean") -> dict:
    """Score the attention-map labels of the run's test images; returns the results document (also
    written to `<results>/segment-attention-<run>-<digest>.json`, its path in "out"). ValueError
    when the block is not a cross-attention map, the token list does not name every class, a
    position is outside the map's tokens, or `draws` is "all"."""
    from featurestore.targets import run_targets

    if parse_draws(draws) == "all":
        raise ValueError("--draws all: the zero-shot baseline trains nothing; give mean or a draw index")
    run = resolve_run(store, run_id)
    if not block.endswith(".attn"):
        maps = [b for b in run.blocks if b.endswith(".attn")]
        raise ValueError(f"the zero-shot baseline reads a cross-attention map (<block>.attn), not {block!r}; "
                         f"this run has {', '.join(maps) if maps else 'none (extract sd15 with --attention-maps)'}")
    prompt = run.spec.get("prompt") or "null"
    if not prompt.startswith("fixed:"):
        raise ValueError(f"the zero-shot baseline needs one prompt for every image (extract with --prompt fixed:TEXT "
                         f"naming the classes), so that a class's tokens sit at the same positions; run {run.run_id} "
                         f"was extracted with --prompt {prompt}")
    tokens = run.array(timestep, block).shape[-3]  # (N, [draws,] tokens, h, w)
    tg = run_targets(run)
    classes = list(tg.classes)
    if len(class_tokens) != len(classes):
        raise ValueError(f"--class-tokens gives {len(class_tokens)} classes, the masks have {len(classes)}: "
                         f"{', '.join(classes)}")
    bad = sorted({p for t in class_tokens for p in t if not 0 <= p < tokens})
    if bad:
        raise ValueError(f"--class-tokens positions {bad} are outside the map's {tokens} tokens")
    train_rows, test_rows = split_rows(run, train_split, test_split, holdout, seed, allow_incomplete)
    train_rows, test_rows = np.intersect1d(train_rows, tg.usable_rows()), np.intersect1d(test_rows, tg.usable_rows())
    if not len(test_rows):
        raise ValueError(f"no test image of run {run.run_id} has readable targets")
    data = StoreBatches(run, [(timestep, block)], TargetReader(tg.masks), batch_size=64,
                        allow_incomplete=allow_incomplete, draws=draws)
    confusion = np.zeros((len(classes), len(classes)), np.int64)
    with bar("segment", f"attention t={timestep} {block}", len(test_rows)) as advance:
        for _, batch in data.passes({"test": test_rows}, None):
            truth = batch.labels.numpy()
            labels = attention_labels(batch.features[(timestep, block)].numpy(), class_tokens, tg.size)
            confusion += confusion_matrix(truth, labels, len(classes), tg.ignore_index)
            advance(len(batch.rows))
    settings = {"run_id": run.run_id, "timestep": timestep, "block": block,
                "class_tokens": [list(t) for t in class_tokens], "train_split": train_split, "test_split": test_split,
                "holdout": holdout, "seed": seed if holdout is not None else None, "allow_incomplete": allow_incomplete,
                "draws": parse_draws(draws), "draws_meaning": draws_meaning(draws, [run], "")}
    settings = single_draw_dropped(settings, [run])
    out = results_path(results, "segment", settings, f"attention-{run.run_id}-{timestep_key(timestep)}-{block}")
    scores = segmentation_scores(confusion, classes)
    grid = grid_variant(tg.resize, tg.size, tg.key)
    scores["variant"]["grid"] = grid
    baseline = majority_baseline(class_pixel_counts(tg.masks, train_rows, len(classes), tg.ignore_index),
                                 confusion.sum(1), classes)
    baseline["variant"]["grid"] = grid
    doc = {"task": "segment-attention", "store": store.url, "run_id": run.run_id, "settings": settings,
           "timestep": timestep, "block": block, "rule": RULE, "prompt": prompt, "classes": classes,
           "runs": run_images([run]), "images": {"test": len(test_rows)}, **scores,
           "confusion": confusion.tolist(), "out": str(out),
           "baseline": baseline}
    write_json(doc, out)
    return doc
