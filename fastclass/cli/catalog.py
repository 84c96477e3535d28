"""Catalog-wide commands: create and open, counts, labels listed, one image's story, store checks."""
from __future__ import annotations

import click

from fastclass.cli import Options, cli, echo_json, json_option, pass_options, progress_reporter


@cli.command()
@click.option("--store", metavar="DIR|s3://BUCKET/PREFIX",
              help="Image store: a folder, or S3-compatible storage [default: images/ beside the catalog].")
@pass_options
def init(opts: Options, store: str | None) -> None:
    """Create a catalog, or upgrade an older one to this version's schema."""
    from fastclass.catalog import init_catalog

    result = init_catalog(opts.location, store)
    what = "created" if result.created else "upgraded" if result.upgraded else "up to date:"
    click.echo(f"Catalog {what} {opts.location} (image store {result.store})")
    for note in result.notes:
        click.echo(f"  {note}")


@cli.command()
@json_option("counts")
@pass_options
def stats(opts: Options, as_json: bool) -> None:
    """Counts of images per label and status, and sources per engine."""
    from fastclass.stats import STATUSES, catalog_stats

    with opts.session() as (_, session):
        data = catalog_stats(session)
    if as_json:
        echo_json(data)
        return
    header = f"{'label':30s} {'total':>7s}" + "".join(f" {s:>8s}" for s in STATUSES)
    click.echo(header)
    for name, counts in data["labels"].items():
        click.echo(f"{name[:30]:30s} {sum(counts.values()):7d}" + "".join(f" {counts.get(s, 0):8d}" for s in STATUSES))
    images = data["images"]
    click.echo(f"{'(all)':30s} {images['total']:7d}" + "".join(f" {images.get(s, 0):8d}" for s in STATUSES))
    if data["engines"]:
        click.echo("Sources per engine: " + ", ".join(f"{e} {n}" for e, n in data["engines"].items()))
    if data["conflicts"]:
        click.echo(f"Open label conflicts: {data['conflicts']} image(s); review them with "
                   "`fastclass clean --status conflict` (list: `fastclass dedup --conflicts`)")


@cli.command()
@json_option("labels")
@pass_options
def labels(opts: Options, as_json: bool) -> None:
    """The labels in the catalog with their image counts."""
    from fastclass.stats import list_labels

    with opts.session() as (_, session):
        rows = list_labels(session)
    if as_json:
        echo_json(rows)
        return
    for row in rows:
        key = str(row["digit"]) if row["digit"] else " "
        click.echo(f"{key} {row['name']:30s} {row['total']:7d} images ({row['ok']} ok, {row['pending']} pending, "
                   f"{row['rejected']} rejected, {row['deleted']} deleted)")


@cli.command()
@click.argument("ref", metavar="ID|SHA256|URL")
@json_option("story")
@pass_options
def image(opts: Options, ref: str, as_json: bool) -> None:
    """One image's whole story: file, hashes, sources, status history, group, conflicts, snapshots, losses."""
    from fastclass.curate.story import image_story
    from fastclass.text import printable

    with opts.session() as (catalog, session):
        story = image_story(session, ref, catalog.store)
    if as_json:
        echo_json(story)
        return
    lines = [f"image {story['id']}  {story['sha256']}",
             f"  label {story['label']}  status {story['status']}" + (f" ({story['reason']})" if story["reason"] else "")
             + ("  reviewed" if story["reviewed"] else ""),
             f"  {story['width']}x{story['height']} {story['format']} {story['mode']}, {story['bytes']} bytes, "
             f"file {story['store_path']} ({story['file']})",
             "  hashes " + ", ".join(f"{k} {v}" for k, v in story["hashes"].items())]
    if story["conflict"]:
        lines.append(f"  OPEN LABEL CONFLICT ({story['conflict']}): claimed as {', '.join(story['claimed_labels'])}")
    lines.append(f"  sources ({len(story['sources'])}):")
    lines += [f"    [{s['label']}] {s['engine']}" + (f" job {s['crawl_job']}" if s["crawl_job"] else "")
              + f" {s['at']:%Y-%m-%d %H:%M} {s['uri']}" for s in story["sources"]]
    if story["group"]:
        g = story["group"]
        lines.append(f"  near-duplicate group {g['id']} (keeper {g['keeper']}): " + ", ".join(
            f"{m['image']} {m['label']} {m['status']}" for m in g["members"]))
    lines.append(f"  reviews ({len(story['reviews'])}):")
    lines += [f"    {r['id']} {r['created_at']:%Y-%m-%d %H:%M} {r['reviewer']} {r['action']}: "
              f"{r['old_status']} -> {r['new_status']}, label {r['old_label']} -> {r['new_label']}"
              for r in story["reviews"]]
    if story["snapshots"]:
        lines.append("  snapshots: " + ", ".join(f"{s['snapshot']} ({s['label']}, {s['split']})"
                                                for s in story["snapshots"]))
    lines += [f"  run {r['run']} ({r['split']}): predicted {r['predicted']} p={r['probability']:.3f} "
              f"loss {r['loss']:.3f}" for r in story["losses"]]
    for line in lines:
        click.echo(printable(line))


@cli.command()
@click.option("--repair", is_flag=True, help="Remove orphan files; reject images whose file is missing or altered "
              "(altered bytes are moved to .quarantine/ in the store).")
@click.option("--workers", type=click.IntRange(1, 256), help="Worker processes for hashing [default: all cores].")
@json_option("result")
@pass_options
def check(opts: Options, repair: bool, workers: int | None, as_json: bool) -> None:
    """Re-hash every stored file against the catalog: missing, altered and orphan files."""
    from fastclass.curate.check import check_store

    update, finish = progress_reporter(opts, "Checking")
    try:
        with opts.session() as (catalog, session):
            result = check_store(session, catalog.store, repair=repair, workers=workers, progress=update)
    finally:
        finish()
    if as_json:
        echo_json(result.as_dict())
    else:
        click.echo(f"Checked {result.files} file(s) against {result.rows} catalog row(s): {len(result.missing)} "
                   f"missing, {len(result.altered)} altered, {len(result.orphans)} orphan(s).")
        for what, ids in (("missing", result.missing), ("altered", result.altered)):
            if ids:
                click.echo(f"  {what}: images {', '.join(map(str, ids[:20]))}" + (" ..." if len(ids) > 20 else ""))
        if result.orphans:
            click.echo(f"  orphans: {', '.join(result.orphans[:5])}" + (" ..." if len(result.orphans) > 5 else ""))
        for snap, count in result.in_snapshots.items():
            click.echo(f"  snapshot {snap} holds {count} of them: re-import their bytes to export it whole")
        if result.repaired:
            click.echo("Repaired: " + ", ".join(f"{n} {what.replace('_', ' ')}" for what, n in result.repaired.items()))
        elif not result.clean:
            click.echo("Run `fastclass check --repair` to reject damaged images and remove orphans.")
    if not result.clean and not repair:
        raise click.exceptions.Exit(1)
