"""`featurestore retrieve`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cli.app import (
    AllowIncompleteFlag, JsonFlag, QuietFlag, ResultsOption, StoreArgument, app, one_value, parse_timestep, user_errors
)
from cli.knn import DrawsOption


def _cutoffs(text: str, option: str, allow_all: bool) -> tuple[int | None, ...]:
    """`all,200` -> (None, 200); empty -> ()."""
    values: list[int | None] = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if allow_all and item == "all":
            values.append(None)
            continue
        try:
            values.append(int(item))
        except ValueError:
            raise ValueError(f"{option} takes {'all or ' if allow_all else ''}integers separated by commas, "
                             f"got {text!r}") from None
    return tuple(values)


@app.command()
@user_errors
def retrieve(
    store: StoreArgument,
    block: Annotated[list[str], typer.Option("--block", "--blocks", help="Block of the queries (and of the gallery unless --gallery-block).")],
    timestep: Annotated[list[str], typer.Option("--timestep", "--timesteps", help="Timestep of the queries (and gallery): one integer, or none.")],
    run: Annotated[Optional[str], typer.Option(help="Run of queries and gallery (needed when the store holds several).")] = None,
    query_run: Annotated[Optional[str], typer.Option(help="Run of the queries [default: --run].")] = None,
    gallery_run: Annotated[Optional[str], typer.Option(help="Run of the gallery [default: --run].")] = None,
    gallery_timestep: Annotated[Optional[str], typer.Option(help="Timestep of the gallery [default: --timestep].")] = None,
    gallery_block: Annotated[Optional[str], typer.Option(help="Block of the gallery [default: --block].")] = None,
    query_domain: Annotated[str, typer.Option(help="Domain of the queries.")] = "sketch",
    gallery_domain: Annotated[str, typer.Option(help="Domain of the gallery.")] = "photo",
    split: Annotated[Optional[str], typer.Option(help="Zero-shot split (a JSON file or a data_manifests/splits "
                                                       "name): unseen classes only.")] = None,
    pool: Annotated[Optional[int], typer.Option(help="Average-pool the maps to SIZE x SIZE first (1: global pool).")] = 4,
    map_at: Annotated[str, typer.Option(help="mAP cutoffs: all and/or integers, comma-separated.")] = "all,200",
    precision_at: Annotated[str, typer.Option(help="Precision cutoffs, comma-separated.")] = "100,200",
    ap: Annotated[str, typer.Option(help="noninterp (mean precision at relevant ranks), voc11 (11-point) or "
                                         "voc-allpoint (VOC all-point, area under the precision envelope).")] = "noninterp",
    map_normalisation: Annotated[str, typer.Option(help="mAP@K (noninterp, voc-allpoint) divides by min "
                                                        "(min(R, K)) or retrieved (relevant items in the top K).")] = "min",
    precision_denominator: Annotated[str, typer.Option(help="P@K divides by k (K) or min (min(K, R)); min-cutoff "
                                                            "counts the top min(K, R) only and divides by min(K, R).")] = "k",
    average: Annotated[str, typer.Option(help="queries (mean over queries) or classes (mean of class means).")] = "queries",
    device: Annotated[str, typer.Option(help="cpu, or cuda (needs faiss-gpu).")] = "cpu",
    slab_rows: Annotated[int, typer.Option(help="Gallery rows read at a time (rounded to whole store chunks).")] = 4096,
    examples: Annotated[int, typer.Option(help="Queries shown with their top 10 (one per class).")] = 5,
    project_dim: Annotated[Optional[int], typer.Option(
        help="Train a projection to this width on the split's SEEN classes (both domains) and retrieve in it.")] = None,
    project_text_embeddings: Annotated[Optional[str], typer.Option(
        help="Train a projection into these class-name embeddings (`featurestore text-embed`), cross-entropy "
             "against the SEEN classes' rows.")] = None,
    project_loss: Annotated[Optional[str], typer.Option(
        help="cross-entropy (cosine classifier over the seen classes) or triplet (sketch anchor, photo "
             "positive and negative).  [default: cross-entropy]")] = None,
    project_margin: Annotated[float, typer.Option(help="Cosine margin of the triplet loss.")] = 0.2,
    project_epochs: Annotated[int, typer.Option(help="Epochs of the projection training.")] = 30,
    project_lr: Annotated[float, typer.Option(help="AdamW learning rate of the projection.")] = 1e-2,
    data_root: Annotated[Optional[str], typer.Option(help="Folder of the gallery images, for the grid PNG "
                                                          "(no grid without it).")] = None,
    query_data_root: Annotated[Optional[str], typer.Option(help="Folder of the query images [default: --data-root].")] = None,
    allow_incomplete: AllowIncompleteFlag = False,
    draws: DrawsOption = "mean",
    out: ResultsOption = None,
    json_out: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Zero-shot sketch-based image retrieval from the cache: exact cosine search (FAISS), mAP and P@K."""
    from featurestore.store import FeatureStore, parse_draws
    from pipelines.analysis import images_note, results_dir, to_json
    from pipelines.analysis.projection import ProjectionConfig
    from pipelines.analysis.retrieval import (
        RetrievalConfig,
        Side,
        retrieve_run,
        save_results,
    )
    from pipelines.progress import set_quiet

    set_quiet(quiet)
    block_name = one_value(block, "--block")
    t = parse_timestep(one_value(timestep, "--timestep"))
    projection = None
    if project_dim is not None or project_text_embeddings is not None:
        projection = ProjectionConfig(project_dim, project_loss or "cross-entropy", project_text_embeddings,
                                      project_epochs, project_lr, margin=project_margin)
    elif project_loss is not None:
        raise ValueError("--project-loss needs a projection: give --project-dim (or --project-text-embeddings)")
    config = RetrievalConfig(
        query=Side(query_run or run, t, block_name, query_domain),
        gallery=Side(gallery_run or run, t if gallery_timestep is None else parse_timestep(gallery_timestep),
                     gallery_block or block_name, gallery_domain),
        split=split, pool=pool, map_at=_cutoffs(map_at, "--map-at", True),
        precision_at=_cutoffs(precision_at, "--precision-at", False), ap=ap, normalisation=map_normalisation,
        precision_denominator=precision_denominator, average=average, device=device, slab_rows=slab_rows,
        examples=examples, projection=projection, allow_incomplete=allow_incomplete, draws=parse_draws(draws),
    )
    folder = results_dir(store, out)
    result = retrieve_run(FeatureStore.open(store), config)
    saved = save_results(result, folder, data_root, query_data_root)
    if json_out:
        typer.echo(to_json(result.to_dict()))
        return
    for name, metric in result.metrics.items():
        variant = ", ".join(f"{k}={v}" for k, v in metric.items() if k != "value" and v is not None)
        typer.echo(f"{name}: {metric['value']:.4f}  ({variant})")
    left_out = result.self_left_out and f"{result.self_left_out} queries: {result.variants['gallery']}"
    for line in filter(None, [*images_note(result.runs), result.draws, left_out]):
        typer.echo(line)
    typer.echo(f"({result.query['images']} {result.query['domain']} queries, {result.gallery['images']} "
               f"{result.gallery['domain']} gallery images, {len(result.classes)} classes, {result.features} features; "
               f"saved {saved}; {result.grid_note or 'grid ' + str(result.grid)})")
