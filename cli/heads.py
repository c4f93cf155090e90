"""`featurestore heads import diffssl|vermouth CKPT`: an official diffssl or Vermouth checkpoint's
trained head as a saved head (the safetensors file with spec metadata that `probe` writes and
`probe --head-file` reads)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.app import heads_app, parse_ints, parse_timestep, split_items, user_errors


def parse_shape(text: str) -> tuple[int, int, int]:
    """`C,H,W` -> (C, H, W) of positive integers."""
    shape = parse_ints(text, "--input-shape")
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"--input-shape takes C,H,W (three positive integers), got {text!r}")
    return shape[0], shape[1], shape[2]


def load_checkpoint(checkpoint: Path):
    """`torch.load(checkpoint, weights_only=True)` on the CPU; ValueError in one line otherwise."""
    import torch

    try:
        return torch.load(checkpoint, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"no checkpoint file {checkpoint}") from None
    except Exception as e:  # a pickle torch refuses, a truncated or foreign file: one line, nothing written
        raise ValueError(f"{checkpoint} is not a torch checkpoint loadable with weights_only=True "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def import_vermouth(checkpoint: Path, inputs: dict, num_classes: int, fuse_arch: str, out: Path) -> None:
    """A Vermouth DiffusionClassifier state dict (`torch.save(model.state_dict())`: `classifier.*`,
    `attn_pool.*`, `text_features`; the frozen `feature_extractor.*` skipped) as a vermouth-uhead file."""
    import torch

    from pipelines.heads.modules import HeadSpec, save_head
    from pipelines.heads.probe import file_sha256
    from pipelines.heads.vermouth import CLIP_DIM, head_from_official

    spec = HeadSpec(kind="vermouth-uhead", inputs=inputs, num_classes=num_classes, classifier="cosine",
                    text_dim=CLIP_DIM, fuse_arch=fuse_arch)
    saved = load_checkpoint(checkpoint)
    if not isinstance(saved, dict) or not any(str(k).startswith("classifier.") for k in saved) or \
            any(not isinstance(v, torch.Tensor) for v in saved.values()):
        raise ValueError(f"{checkpoint} is not a Vermouth DiffusionClassifier state dict (tensors under classifier.*, "
                         "attn_pool.*, text_features)")
    if any(str(k).startswith("expert.mappers.") for k in saved):
        raise ValueError(f"{checkpoint} has a ResNet expert (expert.mappers.*): only heads of one run are imported "
                         "(probe --head-file reads one run)")
    if "text_features" not in saved:
        raise ValueError(f"{checkpoint} has no text_features (the class text embeddings the cosine classifier needs)")
    head = head_from_official(spec, saved)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_head(head, out, extra={"source": "vermouth", "checkpoint": checkpoint.name,
                                "checkpoint_sha256": file_sha256(checkpoint), "official": {"fuse_arch": fuse_arch}})
    typer.echo(f"vermouth-uhead head, inputs {[list(k) for k in inputs]}, {num_classes} classes, from {checkpoint} -> {out}")


@heads_app.command("import")
@user_errors
def heads_import(
    source: Annotated[str, typer.Argument(help="Whose checkpoint: diffssl (github.com/soumik-kanad/diffssl, finetune.py) | vermouth (github.com/develop-productivity/Vermouth, DiffusionClassifier).")],
    checkpoint: Annotated[Path, typer.Argument(help="The checkpoint file (diffssl: torch.save of {'model_head': state dict, ...}; vermouth: of the DiffusionClassifier's state dict).")],
    head_type: Annotated[str, typer.Option(help="Official --head_type: linear (with --head-arc: MLP) | attention.")] = "attention",
    t_list: Annotated[list[str], typer.Option(help="Official --t_list: the timestep(s) the head reads, in order (vermouth: its one --time_step).")] = ...,
    first_fw_b_list: Annotated[Optional[list[str]], typer.Option(help="diffssl (required): official --first_fw_b_list, the block number(s), in order.")] = None,
    block: Annotated[Optional[list[str]], typer.Option("--block", "--blocks", help="Our block names of --first-fw-b-list, same order (default: b<number>); vermouth (required): the four level blocks.")] = None,
    input_shape: Annotated[list[str], typer.Option(help="C,H,W of each block's map, same order (once: all blocks).")] = ...,
    num_classes: Annotated[int, typer.Option(help="Classes of the head (checked against its weights).")] = ...,
    pre_pool_size: Annotated[Optional[int], typer.Option(help="Official --pre_pool_size (default: linear 2, attention 16, as the official scripts).")] = None,
    head_arc: Annotated[str, typer.Option(help="Official --head_arc: MLP hidden widths h1_h2_... (linear only).")] = "",
    norm_type: Annotated[Optional[str], typer.Option(help="Official --norm_type: layer | batch (attention; default layer).")] = None,
    fusion_arc: Annotated[Optional[str], typer.Option(help="Official --fusion_arc (attention; default scripts/attention.sh's).")] = None,
    fuse_arch: Annotated[Optional[str], typer.Option(help="vermouth: official --fuse_arch, tiny (default) | pico | small.")] = None,
    out: Annotated[Path, typer.Option(help="The head file to write (.safetensors).")] = ...,
    force: Annotated[bool, typer.Option(help="Overwrite an existing --out.")] = False,
) -> None:
    """Import a trained head from an official checkpoint; `probe STORE --head-file OUT` tests it."""
    import torch

    from pipelines.heads.diffssl import OFFICIAL_FUSION_ARC, head_from_official, parse_fusion_arc
    from pipelines.heads.modules import HeadSpec, save_head
    from pipelines.heads.probe import file_sha256

    if source not in ("diffssl", "vermouth"):
        raise ValueError(f"unknown checkpoint source {source!r}; known: diffssl, vermouth")
    if out.exists() and not force:
        raise ValueError(f"{out} exists: give another --out or --force to overwrite it")
    if source == "vermouth":
        diffssl_only = {"--first-fw-b-list": first_fw_b_list, "--pre-pool-size": pre_pool_size, "--head-arc": head_arc or None,
                        "--norm-type": norm_type, "--fusion-arc": fusion_arc}
        if given := [option for option, value in diffssl_only.items() if value is not None]:
            raise ValueError(f"{', '.join(given)} set diffssl imports, not vermouth")
        blocks, timesteps = split_items(block), [parse_timestep(t) for t in split_items(t_list)]
        if len(timesteps) != 1 or len(blocks) != 4 or len(input_shape) != 4:
            raise ValueError("a vermouth import takes one --t-list timestep, four --block names and four --input-shape, "
                             "one per block in the same order")
        import_vermouth(checkpoint, {(timesteps[0], b): parse_shape(s) for b, s in zip(blocks, input_shape)},
                        num_classes, fuse_arch or "tiny", out)
        return
    if fuse_arch is not None:
        raise ValueError("--fuse-arch sets vermouth imports, not diffssl")
    if not first_fw_b_list:
        raise ValueError("a diffssl import needs --first-fw-b-list (the official block numbers)")
    if head_type not in ("linear", "attention"):
        raise ValueError(f"unknown --head-type {head_type!r}; the official head types are linear and attention")
    timesteps = [parse_timestep(t) for t in split_items(t_list)]
    numbers = split_items(first_fw_b_list)
    if not all(n.isdigit() for n in numbers):
        raise ValueError(f"--first-fw-b-list takes the official block numbers (e.g. 19,24,30), got {numbers}")
    blocks = split_items(block) or [f"b{n}" for n in numbers]
    if len(blocks) != len(numbers):
        raise ValueError(f"--block names {len(blocks)} blocks, --first-fw-b-list {len(numbers)}")
    shapes = [parse_shape(s) for s in (input_shape if len(input_shape) > 1 else input_shape * len(blocks))]
    if len(shapes) != len(blocks):
        raise ValueError(f"--input-shape given {len(shapes)} times for {len(blocks)} blocks: once, or once per block")
    inputs = {(t, b): shape for t in timesteps for b, shape in zip(blocks, shapes)}
    if head_type == "linear":
        if len(inputs) != 1:
            raise ValueError("the official linear head reads one timestep and one block")
        if norm_type is not None or fusion_arc is not None:
            raise ValueError("--norm-type and --fusion-arc set the attention head, not linear")
        spec = HeadSpec(kind="diffssl-mlp" if head_arc else "diffssl-linear", inputs=inputs, num_classes=num_classes,
                        pre_pool_size=pre_pool_size, head_arc=head_arc)
    else:
        kind = "diffssl-attention" if len(inputs) == 1 else "diffssl-difformer"
        spec = HeadSpec(kind=kind, inputs=inputs, num_classes=num_classes, pre_pool_size=pre_pool_size,
                        head_arc=head_arc, norm_type=norm_type or "layer",
                        **parse_fusion_arc(fusion_arc or OFFICIAL_FUSION_ARC))

    saved = load_checkpoint(checkpoint)
    if not isinstance(saved, dict) or "model_head" not in saved:
        found = sorted(map(str, saved))[:6] if isinstance(saved, dict) else type(saved).__name__
        raise ValueError(f"{checkpoint} is not a diffssl checkpoint: no 'model_head' (found {found})")
    head = head_from_official(spec, saved["model_head"], block_order=numbers if head_type == "attention" else None)
    epoch = saved.get("epoch")
    epoch = int(epoch) if isinstance(epoch, int) or (isinstance(epoch, torch.Tensor) and epoch.numel() == 1) else None
    extra = {"source": "diffssl", "checkpoint": checkpoint.name, "checkpoint_sha256": file_sha256(checkpoint),
             "epoch": epoch, "official": {
                 "head_type": head_type, "t_list": timesteps, "first_fw_b_list": [int(n) for n in numbers],
                 "pre_pool_size": spec.pre_pool_size, "head_arc": head_arc, "norm_type": spec.norm_type,
                 "fusion_arc": (fusion_arc or OFFICIAL_FUSION_ARC) if head_type == "attention" else None}}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_head(head, out, extra=extra)
    typer.echo(f"{spec.kind} head, {len(inputs)} input(s) {[list(k) for k in inputs]}, {num_classes} classes, "
               f"from {checkpoint} (epoch {epoch}) -> {out}")
