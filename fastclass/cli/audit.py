"""Model-assisted cleaning: `embed` and `audit`."""
from __future__ import annotations

from pathlib import Path

import click

from fastclass.cli import (
    COUNT,
    SEED,
    FiniteFloat,
    Options,
    cli,
    echo_json,
    json_option,
    pass_options,
    progress_reporter,
)

SHOWN = 20  # rows per list in the text output; --json has them all


@cli.command()
@click.option("--arch", default="resnet34", show_default=True,
              help="Backbone: any architecture `train` takes (resnet50, tf_efficientnet_lite0, ...).")
@click.option("--pretrained", "pretrained", is_flag=True, help="ImageNet weights (the default without --weights).")
@click.option("--weights", "weights_file", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
              help="A local state_dict or checkpoint of --arch (offline, as for train).")
@click.option("--size", type=click.IntRange(16, 2048), default=224, show_default=True, help="Input size.")
@click.option("--bs", type=click.IntRange(1, 4096), default=64, show_default=True, help="Batch size.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              envvar="FASTCLASS_DEVICE")
@click.option("--workers", type=click.IntRange(0, 64), default=0, show_default=True,
              help="Processes decoding images (0: in this process, best on a CPU-only machine).")
@click.option("--label", help="Only this label's images.")
@click.option("--list", "list_models", is_flag=True, help="List the embedding models and how many images each has.")
@click.option("--queue", "enqueue", is_flag=True,
              help="Only queue the images in chunks, for `fastclass worker`s (e.g. `--queues embed` on GPU "
                   "machines) to embed (PostgreSQL catalogs).")
@click.option("--chunk", type=click.IntRange(1), default=2000, show_default=True,
              help="With --queue: images per queued job.")
@json_option("result")
@pass_options
def embed(opts: Options, arch: str, pretrained: bool, weights_file: Path | None, size: int, bs: int, device: str,
          workers: int, label: str | None, list_models: bool, enqueue: bool, chunk: int, as_json: bool) -> None:
    """Pooled backbone features for every ok image, stored once per (model, weights, size); a re-run or a
    run after a kill computes only the images without one."""
    if list_models:
        from trainer.vectors import list_models as models

        with opts.session() as (_, session):
            rows = models(session)
        if as_json:
            echo_json(rows)
            return
        if not rows:
            click.echo("No embeddings yet; compute them with `fastclass embed`.")
        for row in rows:
            click.echo(f"{row['id']:4d}  {row['arch']:24s} {row['size']:4d}px  {row['dim']:5d} dims  "
                       f"{row['images']:7d} images  {row['weights_loaded']}")
        return
    if pretrained and weights_file is not None:
        raise click.UsageError("--pretrained and --weights contradict each other")
    from trainer.archs import PRETRAINED

    weights = str(weights_file.resolve()) if weights_file else PRETRAINED
    if enqueue:
        from fastclass.cli.curate import _echo_queued
        from fastclass.queue import EMBED_TASK
        from fastclass.queue.tasks import embed_ids, enqueue_chunks

        with opts.session() as (catalog, session):
            ids = embed_ids(session, label)
            chunks = enqueue_chunks(catalog, session, EMBED_TASK, ids, chunk, arch=arch, weights=weights, size=size,
                                    bs=bs, device=device, label=label)
        _echo_queued(chunks, len(ids), "embed", as_json)
        return
    from trainer.embed import embed_images

    update, finish = progress_reporter(opts, "Embedding")
    try:
        with opts.session() as (catalog, session):
            result = embed_images(session, catalog.store, arch, weights, size, bs, device, label, workers, update)
    finally:
        finish()
    if as_json:
        echo_json(result.as_dict())
        return
    click.echo(f"Embedding model {result.model_id} ({result.arch}, {result.size}px, {result.dim} dims; "
               f"{result.weights}): {result.computed} computed, {result.already} already had one, "
               f"{len(result.failed)} failed, of {result.images} ok image(s); {result.seconds:.1f} s on "
               f"{result.device}")
    for failure in result.failed[:SHOWN]:
        click.echo(f"  image {failure['image']}: {failure['reason']}", err=True)


@cli.group(invoke_without_command=True)
@click.option("--embeddings", "model_id", type=COUNT, metavar="MODEL",
              help="The embedding model to use [default: the one with the most images].")
@click.option("--folds", type=click.IntRange(2, 100), default=5, show_default=True,
              help="Cross-validation folds for the out-of-fold probabilities.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--copy-threshold", type=FiniteFloat(0.5, 1.0), default=0.95, show_default=True,
              help="Cosine similarity from which two images are near-copies.")
@json_option("audit")
@click.pass_context
def audit(ctx: click.Context, model_id: int | None, folds: int, seed: int, copy_threshold: float,
          as_json: bool) -> None:
    """Find likely label errors (confident learning on out-of-fold predictions), outliers and near-copies
    from the stored embeddings; every image's scores are kept with the audit. `audit show [ID]` again."""
    if ctx.invoked_subcommand is not None:
        return
    from trainer.audit import run_audit

    with ctx.find_object(Options).session() as (_, session):
        result = run_audit(session, model_id, folds, seed, copy_threshold)
    _echo_audit(result, as_json)


@audit.command("show")
@click.argument("audit_id", type=COUNT, required=False, metavar="[ID]")
@json_option("audit")
@pass_options
def audit_show(opts: Options, audit_id: int | None, as_json: bool) -> None:
    """A stored audit (the latest without ID)."""
    from trainer.audit import show_audit

    with opts.session() as (_, session):
        result = show_audit(session, audit_id)
    _echo_audit(result, as_json)


def _echo_audit(result, as_json: bool) -> None:
    from fastclass.text import printable

    if as_json:
        echo_json(result.as_dict())
        return
    click.echo(f"Audit {result.audit_id} of {result.images} image(s) (embedding model {result.model_id}, "
               f"{result.folds} folds, seed {result.seed}): {len(result.label_issues)} label issue(s), "
               f"{len(result.outliers)} outlier(s), {len(result.near_copies)} near-copy pair(s)")
    if result.without_embedding:
        click.echo(f"  {result.without_embedding} ok image(s) have no embedding under this model and were not "
                   "scored (`fastclass embed`)")
    for name, count in result.skipped_labels.items():
        click.echo(printable(f"  label {name!r} has {count} image(s), fewer than the {result.folds} folds: not "
                             "checked for label issues"))
    if result.label_issues:
        click.echo("Label issues (least likely labels first):")
        for row in result.label_issues[:SHOWN]:
            click.echo(printable(f"  image {row['image']:<7d} labelled {row['label'][:24]:24s} suggested "
                                 f"{row['suggested'][:24]:24s} quality {row['score']:.4f}"))
    if result.outliers:
        click.echo("Outliers (farthest from every class first):")
        for row in result.outliers[:SHOWN]:
            click.echo(printable(f"  image {row['image']:<7d} labelled {row['label'][:24]:24s} score "
                                 f"{row['score']:.4f}"))
    if result.near_copies:
        click.echo("Near-copies (most similar first; `fastclass dedup --embeddings` groups them):")
        for row in result.near_copies[:SHOWN]:
            a, b = row["images"]
            click.echo(f"  images {a} and {b}: similarity {row['similarity']:.4f}")
    if result.label_issues or result.outliers:
        click.echo(f"Review them first: fastclass clean --order issues --audit {result.audit_id}")
