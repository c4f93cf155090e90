"""Class-name text embeddings for cosine classifiers: written from a text encoder (SD's CLIP),
read back checked against a run's classes. File: safetensors with a tensor "embeddings" (K, D)
and metadata {"classes": JSON list of class names in label order}."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

DEFAULT_TEMPLATE = "a photo of a {}"


def write_text_embeddings(backbone, classes: Sequence[str], path: str | Path, template: str = DEFAULT_TEMPLATE) -> Path:
    """Embed `template` filled with each class name (underscores as spaces) and save the table."""
    from safetensors.torch import save_file

    if not hasattr(backbone, "embed_texts"):
        raise ValueError(f"{backbone.name} has no text encoder to embed class names with (use sd15)")
    if "{}" not in template:
        raise ValueError(f"the template needs '{{}}' where the class name goes, got {template!r}")
    with torch.inference_mode():
        embeddings = backbone.embed_texts([template.format(c.replace("_", " ")) for c in classes])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"embeddings": embeddings.float().cpu().contiguous()}, str(path),
              metadata={"classes": json.dumps(list(classes)), "template": template, "backbone": backbone.name,
                        "weights_digest": backbone.weights_digest})
    return path


def read_text_embeddings(path: str, classes: list[str]) -> torch.Tensor:
    """The (K, D) class-name embeddings of `path`, refused unless its classes are the run's, in label order."""
    names, text = _read_table(path)
    if names != classes:
        diff = next((k for k in range(min(len(names), len(classes))) if names[k] != classes[k]), min(len(names), len(classes)))
        raise ValueError(f"--text-embeddings {path}: classes do not match the run's ({len(names)} vs {len(classes)}; "
                         f"first difference at label {diff}: {names[diff:diff + 1]} vs {classes[diff:diff + 1]})")
    return text


def select_text_embeddings(path: str, classes: list[str]) -> torch.Tensor:
    """The rows of `path` for `classes`, in that order: a table written for all of a dataset's
    classes serves any subset of them (e.g. the seen classes of a zero-shot split)."""
    names, text = _read_table(path)
    missing = [c for c in classes if c not in names]
    if missing:
        raise ValueError(f"--text-embeddings {path}: no embedding for class(es) {', '.join(missing[:8])}"
                         f"{' ...' if len(missing) > 8 else ''} (it has {len(names)} classes)")
    return text[[names.index(c) for c in classes]]


def _read_table(path: str) -> tuple[list[str], torch.Tensor]:
    """(class names, float32 (K, D) embeddings) of the table at `path`. ValueError (naming
    --text-embeddings) for a file that is not safetensors or lacks the tensor or the classes, and
    for a table no cosine classifier can use: a non-finite value, or a row of norm 0 (its cosine
    with anything is undefined)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as f:
            tensors = list(f.keys())  # a safe_open handle is not iterable
            if "embeddings" not in tensors:
                raise ValueError(f"--text-embeddings {path}: no tensor 'embeddings' (found: {', '.join(tensors)})")
            text = f.get_tensor("embeddings")
            meta = f.metadata() or {}
    except SafetensorError as e:
        raise ValueError(f"--text-embeddings {path}: not a safetensors file ({e})") from None
    if "classes" not in meta:
        raise ValueError(f"--text-embeddings {path}: no 'classes' metadata (a JSON list of class names in label order)")
    names = json.loads(meta["classes"])
    if text.ndim != 2 or len(names) != text.shape[0]:
        raise ValueError(f"--text-embeddings {path}: 'embeddings' {tuple(text.shape)} does not hold one row per class "
                         f"of {len(names)}")
    text = text.float()
    bad = [names[k] for k in range(len(names)) if not bool(text[k].isfinite().all())]
    if bad:
        raise ValueError(f"--text-embeddings {path}: non-finite values in the rows of {len(bad)} class(es): "
                         f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}")
    zero = [names[k] for k in range(len(names)) if not bool(text[k].any())]
    if zero:
        raise ValueError(f"--text-embeddings {path}: the rows of {len(zero)} class(es) have norm 0 (no cosine is "
                         f"defined): {', '.join(zero[:8])}{' ...' if len(zero) > 8 else ''}")
    return names, text
