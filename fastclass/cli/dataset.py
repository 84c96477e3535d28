"""Datasets: split, and snapshots (create, list, show, diff, export, delete)."""
from __future__ import annotations

from pathlib import Path

import click

from fastclass.cli import COUNT_OR_ZERO, SEED, Options, cli, echo_json, json_option, pass_options, progress_reporter


@cli.command()
@click.option("--valid-pct", type=float, metavar="FRACTION",
              help="Share of each label's images in valid [default: the current split's, else 0.2].")
@click.option("--seed", type=SEED, help="Seed of the assignment [default: the current split's, else 42].")
@click.option("--min-valid", type=COUNT_OR_ZERO, help="At least this many valid images per label that can spare "
              "them [default: the current split's, else 1].")
@click.option("--new", "new_split", is_flag=True, help="Start a new split with these settings instead of "
              "extending the current one (old assignments are kept for the snapshots made with them).")
@json_option("result")
@pass_options
def split(opts: Options, valid_pct: float | None, seed: int | None, min_valid: int | None, new_split: bool,
          as_json: bool) -> None:
    """Assign train/valid to every ok image not yet assigned; old images never change side."""
    from fastclass.dataset.split import assign_splits

    with opts.session() as (_, session):
        result = assign_splits(session, valid_pct, seed, min_valid, new=new_split)
    if as_json:
        echo_json(result.as_dict())
        return
    what = "New split" if result.created else "Split"
    click.echo(f"{what} #{result.split_id} ({result.params.describe()}): assigned {result.assigned} image(s)"
               + (f", moved {result.regrouped} to join their duplicate group's side" if result.regrouped else "")
               + ".")
    click.echo(f"{'label':30s} {'train':>7s} {'valid':>7s} {'valid %':>8s} {'new':>6s}")
    for row in result.labels:
        warn = "  too small to split: all train" if row.too_small else ""
        click.echo(f"{row.label[:30]:30s} {row.train:7d} {row.valid:7d} {100 * row.valid_fraction:7.1f}% "
                   f"{row.new:6d}{warn}")
    if result.too_small:
        click.echo(f"Warning: {len(result.too_small)} label(s) have too few images for a validation set: "
                   + ", ".join(result.too_small), err=True)
    _echo_skipped(result.skipped)


def _echo_skipped(skipped: dict[str, int]) -> None:
    """Say what a split or snapshot left out and what to run about it."""
    fixes = {"pending": "not verified yet: run `fastclass verify`",
             "conflict": "open label conflicts: review them with `fastclass clean --status conflict`"}
    for why, count in skipped.items():
        click.echo(f"Left out {count} image(s): {fixes[why]}", err=True)


@cli.group()
def snapshot() -> None:
    """Immutable, named freezes of the dataset: create, list, show, diff, export, delete."""


def _echo_snapshot(info) -> None:
    click.echo(f"Snapshot {info.name}: {info.images} image(s), {info.train} train / {info.valid} valid, "
               f"{len(info.labels)} label(s)")
    click.echo(f"  digest  {info.digest}")
    click.echo(f"  split   #{info.split_id} (--valid-pct {info.valid_pct:g} --seed {info.seed} "
               f"--min-valid {info.min_valid})")
    click.echo(f"  created {info.created_at:%Y-%m-%d %H:%M:%S} UTC" + (f"  note: {info.note}" if info.note else ""))
    if info.label_filter:
        click.echo(f"  labels  {', '.join(info.label_filter)}")
    if info.min_per_label:
        click.echo(f"  min per label {info.min_per_label}")
    for label, counts in info.labels.items():
        click.echo(f"    {label[:30]:30s} {counts['train']:7d} train {counts['valid']:7d} valid")


@snapshot.command("create")
@click.argument("name")
@click.option("--label", "labels", multiple=True, metavar="NAME", help="Only this label (repeatable).")
@click.option("--min-per-label", type=COUNT_OR_ZERO, default=0, show_default=True,
              help="Leave out labels with fewer ok images.")
@click.option("--note", metavar="TEXT", help="A note kept with the snapshot.")
@click.option("--allow-conflicts", is_flag=True, help="Leave out images with open label conflicts instead of refusing.")
@json_option("snapshot")
@pass_options
def snapshot_create(opts: Options, name: str, labels: tuple[str, ...], min_per_label: int, note: str | None,
                    allow_conflicts: bool, as_json: bool) -> None:
    """Freeze the current ok images with their label and split under NAME."""
    from fastclass.dataset.snapshot import create_snapshot

    with opts.session() as (_, session):
        info = create_snapshot(session, name, labels, min_per_label, note, allow_conflicts)
    if as_json:
        echo_json(info.as_dict())
        return
    _echo_snapshot(info)
    _echo_skipped(info.skipped)
    for label, count in sorted(info.excluded_labels.items()):
        click.echo(f"Left out {label}: {count} ok image(s), fewer than --min-per-label {min_per_label}", err=True)


@snapshot.command("list")
@json_option("snapshots")
@pass_options
def snapshot_list(opts: Options, as_json: bool) -> None:
    """The snapshots in the catalog, oldest first."""
    from fastclass.dataset.snapshot import list_snapshots

    with opts.session() as (_, session):
        infos = list_snapshots(session)
    if as_json:
        echo_json([info.as_dict() for info in infos])
        return
    if not infos:
        click.echo("No snapshots yet; make one with `fastclass snapshot create NAME`.")
    for info in infos:
        click.echo(f"{info.name:24s} {info.images:8d} images {len(info.labels):4d} labels  "
                   f"{info.created_at:%Y-%m-%d %H:%M}  {info.digest[:12]}" + (f"  {info.note}" if info.note else ""))


@snapshot.command("show")
@click.argument("name")
@click.option("--content", is_flag=True, help="Also re-hash every file of the snapshot (a content-level check).")
@json_option("snapshot")
@pass_options
def snapshot_show(opts: Options, name: str, content: bool, as_json: bool) -> None:
    """A snapshot with its per-label counts and an integrity check of its rows (and files, with --content)."""
    from fastclass.dataset.snapshot import show_snapshot

    with opts.session() as (catalog, session):
        info = show_snapshot(session, name, catalog.store if content else None)
    if as_json:
        echo_json(info.as_dict())
        return
    _echo_snapshot(info)
    click.echo("Digest check (rows): " + ("ok" if info.digest_ok else "MISMATCH: the items no longer match the digest"))
    if info.damaged is None:
        click.echo("Files not re-hashed: `fastclass snapshot show --content` checks their bytes too.")
    elif info.damaged:
        click.echo(f"Content check: {len(info.damaged)} file(s) missing or altered (images "
                   f"{', '.join(map(str, info.damaged[:10]))}); see `fastclass check`")
    else:
        click.echo(f"Content check: ok ({info.images} file(s) re-hashed)")


@snapshot.command("diff")
@click.argument("old")
@click.argument("new")
@json_option("differences")
@pass_options
def snapshot_diff(opts: Options, old: str, new: str, as_json: bool) -> None:
    """What changed from snapshot OLD to snapshot NEW: added, removed, relabelled, moved between splits."""
    from fastclass.dataset.snapshot import diff_snapshots

    with opts.session() as (_, session):
        diff = diff_snapshots(session, old, new)
    if as_json:
        echo_json(diff.as_dict())
        return
    click.echo(f"{old} -> {new}: {len(diff.added)} added, {len(diff.removed)} removed, "
               f"{len(diff.relabelled)} relabelled, {len(diff.moved)} moved, {diff.unchanged} unchanged")
    for row in diff.added:
        click.echo(f"  + {row['sha256'][:16]}  {row['label']} ({row['split']})")
    for row in diff.removed:
        click.echo(f"  - {row['sha256'][:16]}  {row['label']} ({row['split']})")
    for row in diff.relabelled:
        click.echo(f"  ~ {row['sha256'][:16]}  label {row['from']} -> {row['to']}")
    for row in diff.moved:
        click.echo(f"  > {row['sha256'][:16]}  {row['label']}: {row['from']} -> {row['to']}")


@snapshot.command("export")
@click.argument("name")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["imagefolder", "csv"]), default="imagefolder", show_default=True,
              help="imagefolder: DIR/{train,valid}/<label>/; csv: DIR/labels.csv (path,label,is_valid) + DIR/images/.")
@click.option("--link", is_flag=True, help="Hard links into the store instead of copies: no space used, but "
              "an editor that saves over an exported file in place then rewrites the store's bytes.")
@json_option("result")
@pass_options
def snapshot_export(opts: Options, name: str, directory: Path, fmt: str, link: bool, as_json: bool) -> None:
    """Write a snapshot's images to a new folder (copies, or reflinks where the file system has them)."""
    from fastclass.dataset.snapshot import export_snapshot

    update, finish = progress_reporter(opts, "Exporting")
    try:
        with opts.session() as (catalog, session):
            result = export_snapshot(session, catalog.store, name, directory, fmt, progress=update, link=link)
    finally:
        finish()
    if as_json:
        echo_json(result.as_dict())
        return
    click.echo(f"Exported {name} to {result.directory} as {fmt}: {result.files} file(s) "
               f"({result.per_split['train']} train, {result.per_split['valid']} valid; "
               f"{result.copied} copied, {result.cloned} reflinked, {result.linked} hard-linked).")


@snapshot.command("delete")
@click.argument("name")
@pass_options
def snapshot_delete(opts: Options, name: str) -> None:
    """Delete a snapshot (its images and files stay in the catalog and store)."""
    from fastclass.dataset.snapshot import delete_snapshot

    with opts.session() as (_, session):
        delete_snapshot(session, name)
    click.echo(f"Deleted snapshot {name}.")
