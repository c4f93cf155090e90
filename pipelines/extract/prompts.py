"""Prompts for conditional backbones, one per image, from `--prompt`:

- `null`: the empty prompt (the unconditional embedding);
- `classnames` or `classnames:TEMPLATE`: the class name in a template (default "a photo of a {}");
- `fixed:TEXT`: the same text for every image;
- `file:PATH`: a CSV with columns id,prompt covering every image of the manifest;
- `blip`: the image's BLIP caption, generated once per image and kept in the store;
- `tags` or `tags:TEMPLATE`: the names of the classes present in the image's mask (the oracle
  tags of TADP, Kondapaneni et al. 2024, "Text-image alignment for diffusion-based perception";
  its captioning/caption_variants.py `get_class_names`: every class whose index occurs in the
  mask, ignored pixels left out, in class order, background included, joined by a space), put in
  TEMPLATE where "{}" stands (default "{}": the names alone, as TADP's captions are);
- `tags:FILE`: predicted tags instead, a CSV with columns id,tags (the tags text as it goes into
  the template) covering every image of the manifest.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_manifests.manifest import Manifest

DEFAULT_TEMPLATE = "a photo of a {}"
TAGS_TEMPLATE = "{}"  # TADP's oracle captions are the class names alone
TAGS_JOIN = " "  # TADP joins the names with a space (caption_variants.py)


@dataclass(frozen=True)
class PromptSource:
    kind: str  # null | classnames | fixed | file | blip | tags
    argument: str = ""  # the template, the text or the file path (tags: a CSV of predicted tags, or "")
    template: str = ""  # tags: where the tags go

    @property
    def spec(self) -> str:
        """What decides the prompts, for the run spec: a file by the digest of its content."""
        if self.kind == "file":
            return f"file:sha256:{hashlib.sha256(Path(self.argument).read_bytes()).hexdigest()}"
        if self.kind == "tags":  # the oracle's tags come from the masks, which the manifest digest covers
            if self.argument:
                return f"tags:sha256:{hashlib.sha256(Path(self.argument).read_bytes()).hexdigest()}"
            return f"tags:{self.template}"
        return self.kind if self.kind in ("null", "blip") else f"{self.kind}:{self.argument}"


def parse_prompt(text: str) -> PromptSource:
    kind, _, argument = text.partition(":")
    if kind in ("null", "blip") and not argument:
        return PromptSource(kind)
    if kind == "classnames":
        template = argument or DEFAULT_TEMPLATE
        if "{}" not in template:
            raise ValueError(f"--prompt classnames:TEMPLATE needs '{{}}' where the class name goes, got {template!r}")
        return PromptSource(kind, template)
    if kind == "fixed" and argument:
        return PromptSource(kind, argument)
    if kind == "file" and argument:
        if not Path(argument).is_file():
            raise ValueError(f"--prompt file: {argument} does not exist")
        return PromptSource(kind, argument)
    if kind == "tags":
        if not argument or "{}" in argument:
            return PromptSource(kind, "", argument or TAGS_TEMPLATE)
        if not Path(argument).is_file():
            raise ValueError(f"--prompt tags:{argument}: no such file, and not a template (a template holds '{{}}' "
                             "where the tags go)")
        return PromptSource(kind, argument, TAGS_TEMPLATE)
    raise ValueError(f"--prompt {text!r}: use null, blip, classnames[:TEMPLATE], fixed:TEXT, file:PATH, "
                     "tags[:TEMPLATE] or tags:FILE")


def prompts_for(source: PromptSource, ids: Sequence[str], class_names: Sequence[str],
                captions: Sequence[str] | None = None, tags: Sequence[str] | None = None) -> list[str]:
    """One prompt per image (captions: the stored caption of each image, for `blip`; tags: each
    image's tags text, `image_tags`, for `tags`)."""
    if source.kind == "null":
        return [""] * len(ids)
    if source.kind == "fixed":
        return [source.argument] * len(ids)
    if source.kind == "classnames":
        return [source.argument.format(name.replace("_", " ")) for name in class_names]
    if source.kind == "blip":
        if captions is None or len(captions) != len(ids):
            raise ValueError("blip prompts need one stored caption per image")
        return list(captions)
    if source.kind == "tags":
        if tags is None or len(tags) != len(ids):
            raise ValueError("tags prompts need one tags text per image")
        return [source.template.format(text) for text in tags]
    return _column_from_file(Path(source.argument), ids, "prompt")


def image_tags(source: PromptSource, manifest: Manifest) -> list[str]:
    """Each image's tags text for `--prompt tags`: the CSV's `tags` cell (tags:FILE), or the
    names of the classes present in its mask, in class order, joined by TAGS_JOIN (the oracle;
    values outside the class list, the ignore index 255 among them, are left out). Raises
    ValueError (one line) when the manifest has no mask column, an image has no mask, or the
    CSV has no row for some image; ManifestError for a mask that cannot be read."""
    if source.argument:
        return _column_from_file(Path(source.argument), manifest.ids, "tags")
    if "mask" not in manifest.targets:
        raise ValueError(f"--prompt tags names the classes in each image's mask, and manifest {manifest.name!r} has "
                         "no mask column; give predicted tags with --prompt tags:FILE (a CSV of id,tags)")
    from data_manifests.targets import load_target

    classes = manifest.target_info["mask"]["classes"]
    out = []
    for i in range(len(manifest)):
        mask = load_target(manifest, "mask", i)
        if mask is None:
            raise ValueError(f"--prompt tags: image {manifest.ids[i]!r} of {manifest.name!r} has no mask to take "
                             "its tags from; give predicted tags with --prompt tags:FILE")
        out.append(TAGS_JOIN.join(classes[c] for c in np.unique(mask).tolist() if c < len(classes)))
    return out


def _column_from_file(path: Path, ids: Sequence[str], column: str) -> list[str]:
    """Per id, the `column` cell of its row in a CSV with columns id,<column>."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"id", column} <= set(reader.fieldnames):
            raise ValueError(f"{path}: a {column} file is a CSV with columns id,{column}")
        by_id = {row["id"]: row[column] for row in reader}
    missing = [i for i in ids if i not in by_id]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise ValueError(f"{path} has no {column} for {len(missing)} images: {shown}")
    return [by_id[i] for i in ids]
