"""`featurestore correspond`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.app import (
    AllowIncompleteFlag, JsonFlag, QuietFlag, ResultsOption, RunOption, StoreArgument, app, parse_blocks,
    parse_stored_timesteps, split_items, user_errors
)
from cli.knn import DrawsOption


@app.command()
@user_errors
def correspond(
    store: StoreArgument,
    run: RunOption = None,
    timesteps: Annotated[Optional[list[str]], typer.Option(
        "--timesteps", "--timestep", help="all (default) or T,...; repeated or comma-separated (none for experts).")] = None,
    blocks: Annotated[Optional[list[str]], typer.Option(
        "--blocks", "--block", help="all (default) or NAME,...; repeated or comma-separated. Every (t, block) is "
                                    "scored in one pass over the pairs.")] = None,
    upsample: Annotated[str, typer.Option(
        help="input: DIFT's match on the target map upsampled to the image's pixels; feature: cosine at feature "
             "resolution refined by a soft-argmax.")] = "input",
    soft_radius: Annotated[Optional[int], typer.Option(
        help="--upsample feature: soft-argmax window radius in cells (default 1).")] = None,
    soft_temperature: Annotated[Optional[float], typer.Option(
        help="--upsample feature: soft-argmax temperature on the cosine (default 0.05).")] = None,
    alpha: Annotated[str, typer.Option(help="PCK alphas, comma-separated (finite, positive).")] = "0.05,0.1,0.15",
    bbox_of: Annotated[str, typer.Option(
        "--bbox-of", help="Whose box sets the bbox threshold: target (SPair/DIFT) or source.")] = "target",
    split: Annotated[Optional[str], typer.Option(help="Score only the pairs of this split (default: all).")] = None,
    save_matches: Annotated[Optional[str], typer.Option(
        help="Write FILE.csv, one row per scored keypoint: pair,category,kp,src_x,src_y,true_x,true_y,pred_x,"
             "pred_y,bbox_w,bbox_h,img_w,img_h (original target pixels); one (t, block) only.")] = None,
    allow_incomplete: AllowIncompleteFlag = False,
    draws: DrawsOption = "mean",
    out: ResultsOption = None,
    json_out: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Semantic correspondence (DIFT's protocol) from the cache: each source keypoint's feature, its
    nearest target position by cosine, PCK@alpha per image and per point at the bbox and image
    thresholds, overall and per category."""
    from featurestore.store import FeatureStore
    from pipelines.analysis import images_note, output_path, results_dir, to_json
    from pipelines.correspond.runner import correspond_run, left_out_notes, save_correspond
    from pipelines.correspond.runner import save_matches as write_matches
    from pipelines.progress import set_quiet

    set_quiet(quiet)
    try:
        alphas = [float(a) for a in split_items([alpha])]
    except ValueError:
        raise ValueError(f"--alpha takes numbers separated by commas, got {alpha!r}") from None
    folder = results_dir(store, out)
    t_list, block_list = parse_stored_timesteps(timesteps), parse_blocks(blocks)
    if save_matches is not None and (t_list is None or block_list is None or len(t_list) * len(block_list) != 1):
        raise ValueError("--save-matches writes the matches of one map: give one --timestep and one --block")
    if save_matches is not None and Path(save_matches).exists():
        raise ValueError(f"{save_matches} exists; --save-matches never overwrites a file (remove it or name another)")
    if save_matches is not None:
        output_path(save_matches, "--save-matches", "file")
    result, matches = correspond_run(FeatureStore.open(store), run, t_list, block_list, upsample, soft_radius,
                                     soft_temperature, alphas, split, allow_incomplete, draws, bbox_of)
    saved = save_correspond(result, folder)
    if save_matches is not None:
        write_matches(next(iter(matches.values())), save_matches)
    if json_out:
        typer.echo(to_json(result.to_dict()))
        return
    settings = result.settings
    soft = (f" (soft-argmax window R = {settings['soft_radius']} cells, temperature T = "
            f"{settings['soft_temperature']})" if result.upsample == "feature" else "")
    typer.echo(f"run {result.run_id} ({result.dataset}, {result.geometry}): {result.pairs['scored']} pairs, "
               f"{result.points['scored']} points; upsample {result.upsample}{soft}; bbox threshold from the "
               f"{result.bbox_of}'s box")
    typer.echo("| t | block | threshold | average | " + " | ".join(f"PCK@{a}" for a in result.alphas) + " |")
    typer.echo("|---|---|---|---|" + "---|" * len(result.alphas))
    for m in result.maps:
        t = "none" if m.timestep is None else m.timestep  # as --timestep takes it
        for threshold in ("bbox", "image"):
            scores = m.pck["overall"][threshold]
            for average in ("per_image", "per_point"):
                values = ["n/a (no bbox)"] * len(result.alphas) if scores is None else \
                    [f"{scores[average][str(a)]:.4f}" for a in result.alphas]
                typer.echo(f"| {t} | {m.block} | {threshold} | {average} | " + " | ".join(values) + " |")
    for line in filter(None, [*images_note(result.runs), settings.get("draws_meaning")]):
        typer.echo(line)
    notes = left_out_notes(result.pairs, result.points, result.blocks_left_out)
    if notes:
        typer.echo("left out: " + "; ".join(notes))
    typer.echo(f"(saved {saved}" + (f"; matches in {save_matches}" if save_matches else "") + ")")
