"""Prompts for conditional backbones, one per image, from `--prompt`:

- `null`: the empty prompt (the unconditional embedding);
- `classnames` or `classnames:TEMPLATE`: the class name in a template (default "a photo of a {}");
- `fixed:TEXT`: the same text for every image;
- `file:PATH`: a CSV with columns id,prompt covering every image of the manifest;
- `blip`: the image's BLIP caption, generated once per image and kept in the store.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TEMPLATE = "a photo of a {}"


@dataclass(frozen=True)
class PromptSource:
    kind: str  # null | classnames | fixed | file | blip
    argument: str = ""  # the template, the text or the file path

    @property
    def spec(self) -> str:
        """What decides the prompts, for the run spec: a file by the digest of its content."""
        if self.kind == "file":
            return f"file:sha256:{hashlib.sha256(Path(self.argument).read_bytes()).hexdigest()}"
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
    raise ValueError(f"--prompt {text!r}: use null, blip, classnames[:TEMPLATE], fixed:TEXT or file:PATH")


def prompts_for(source: PromptSource, ids: Sequence[str], class_names: Sequence[str],
                captions: Sequence[str] | None = None) -> list[str]:
    """One prompt per image (captions: the stored caption of each image, for `blip`)."""
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
    return _prompts_from_file(Path(source.argument), ids)


def _prompts_from_file(path: Path, ids: Sequence[str]) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"id", "prompt"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: a prompt file is a CSV with columns id,prompt")
        by_id = {row["id"]: row["prompt"] for row in reader}
    missing = [i for i in ids if i not in by_id]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise ValueError(f"{path} has no prompt for {len(missing)} images: {shown}")
    return [by_id[i] for i in ids]
