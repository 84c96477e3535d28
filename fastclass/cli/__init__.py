"""The `fastclass` command line: parse options, call one service, print its result."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click

from fastclass import __version__
from fastclass.errors import FastclassError

log = logging.getLogger("fastclass")


@dataclass
class Options:
    catalog: str | None
    verbose: bool
    quiet: bool

    @property
    def location(self) -> str:
        from fastclass.catalog import resolve_location

        return resolve_location(self.catalog)

    def open(self):
        from fastclass.catalog import open_catalog

        return open_catalog(self.location)

    @contextlib.contextmanager
    def session(self):
        """Open the catalog, yield (catalog, session) in one committed scope, close the catalog."""
        catalog = self.open()
        try:
            with catalog.session() as session:
                yield catalog, session
        finally:
            catalog.close()


class FastclassGroup(click.Group):
    """Turns service errors into one `Error: ...` line and exit code 1 (a traceback only with -v)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        # A closed pipe (`fastclass runs | head`) goes to click, which ends quietly.
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort, BrokenPipeError):
            raise
        except FastclassError as exc:
            _maybe_traceback(ctx)
            raise click.ClickException(str(exc)) from exc
        except KeyboardInterrupt:
            click.echo("Error: interrupted; everything committed so far is kept, re-run to continue", err=True)
            ctx.exit(130)
        except Exception as exc:
            _maybe_traceback(ctx)
            first = (str(exc).strip().splitlines() or [""])[0]
            raise click.ClickException(
                f"unexpected {type(exc).__name__}: {first} (run with -v for the traceback)") from exc


def _maybe_traceback(ctx: click.Context) -> None:
    opts = ctx.find_object(Options)
    if opts is not None and opts.verbose:
        traceback.print_exc()


@click.group(cls=FastclassGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--catalog", metavar="PATH|URL", help="Catalog file or database URL [env FASTCLASS_CATALOG; default ./fastclass.db].")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging and tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="Only results and errors; no progress bars.")
@click.version_option(__version__, prog_name="fastclass")
@click.pass_context
def cli(ctx: click.Context, catalog: str | None, verbose: bool, quiet: bool) -> None:
    """Turn a list of class names into a clean, versioned image dataset and a trained classifier."""
    if verbose and quiet:
        raise click.UsageError("-v and -q cannot be used together")
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    # Libraries (alembic, PIL, urllib3) speak only at WARNING; -v opens our own packages to DEBUG.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr, force=True)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(PrintableFormatter("%(message)s"))
    for name in ("fastclass", "trainer", "db"):
        logging.getLogger(name).setLevel(level)
    # fastai decorates functions with torch.jit.script at import; the deprecation is not the user's to act on.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    ctx.obj = Options(catalog, verbose, quiet)


class PrintableFormatter(logging.Formatter):
    """Log lines carry URLs and names from the web: escape sequences in them must not reach the terminal."""

    def format(self, record: logging.LogRecord) -> str:
        from fastclass.text import printable

        return "\n".join(printable(line) for line in super().format(record).split("\n"))


pass_options = click.make_pass_decorator(Options)


def progress_reporter(opts: Options, label: str) -> tuple[Callable[..., None] | None, Callable[[], None]]:
    """A progress callback update(done, total[, detail]) that draws a bar on a terminal, with the detail
    text after it (none with -q or when stderr is not a TTY)."""
    if opts.quiet or not sys.stderr.isatty():
        return None, lambda: None
    state: dict = {}

    def update(done: int, total: int, detail: str | None = None) -> None:
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = click.progressbar(length=total, label=label, file=sys.stderr,
                                                   item_show_func=lambda item: item)
            bar.__enter__()
        bar.update(done - bar.pos, detail)

    def finish() -> None:
        bar = state.pop("bar", None)
        if bar is not None:
            bar.__exit__(None, None, None)

    return update, finish


class FiniteFloat(click.FloatRange):
    """A float range that also refuses nan and infinity (`nan` compares false with every bound)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if number != number or number in (float("inf"), float("-inf")):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


FINITE_AT_LEAST_ONE = FiniteFloat(1.0)
# Numbers that reach the catalog fit its 64-bit signed integers (a larger one made "unexpected OverflowError").
ROW_ID = click.IntRange(1, 2**63 - 1)
SEED = click.IntRange(0, 2**63 - 1)
COUNT = click.IntRange(1, 2**63 - 1)
COUNT_OR_ZERO = click.IntRange(0, 2**63 - 1)


def budget_options(command: Callable) -> Callable:
    """--file-timeout / --file-memory: what decoding one file may take (see fastclass.workers.Budget)."""
    command = click.option("--file-memory", type=click.IntRange(64, 1 << 20), default=2048, show_default=True,
                           metavar="MB", help="Memory decoding one file may use; a file that needs more is "
                           "rejected.")(command)
    return click.option("--file-timeout", type=FiniteFloat(0.1, 86400.0), default=30.0, show_default=True,
                        metavar="SECONDS", help="Time decoding one file may take; a file that takes longer is "
                        "rejected.")(command)


def make_budget(file_timeout: float, file_memory: int):
    from fastclass.workers import Budget

    return Budget(file_timeout, file_memory)


def echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


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


@cli.command("import")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--label", metavar="NAME", help="One label for every file (a flat folder); else DIR/<label>/<files>.")
@click.option("--workers", type=click.IntRange(1, 256), help="Worker processes for hashing [default: all cores].")
@budget_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_options
def import_(opts: Options, directory: Path, label: str | None, workers: int | None, file_timeout: float,
            file_memory: int, as_json: bool) -> None:
    """Import an existing folder of images: DIR/<label>/<files>, or --label for a flat folder."""
    from fastclass.ingest.importer import import_folder

    update, finish = progress_reporter(opts, "Importing")
    try:
        with opts.session() as (catalog, session):
            result = import_folder(session, catalog.store, directory, label=label, workers=workers, progress=update,
                                   budget=make_budget(file_timeout, file_memory))
    finally:
        finish()
    if as_json:
        echo_json(result.as_dict())
        return
    click.echo(f"Imported {result.new_images} new image(s) from {result.files} file(s); "
               f"{result.exact_duplicates} already in the catalog or repeated, "
               f"{result.new_sources} new source(s).")
    for lab, count in sorted(result.new_per_label.items()):
        click.echo(f"  {lab}: {count} new")
    if result.conflicts:
        click.echo(f"{result.conflicts} file(s) were already in the catalog under another label: each claim is "
                   "recorded and the image is a label conflict (`fastclass clean --status conflict`).")
    if result.skipped:
        click.echo(f"Skipped {sum(result.skipped.values())} file(s):")
        for reason, count in result.skipped.most_common():
            click.echo(f"  {count:6d}  {reason}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
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
@click.option("--json", "as_json", is_flag=True, help="Print the labels as JSON.")
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
@click.option("--label", metavar="NAME", help="Only images of this label.")
@click.option("--min-size", default="32x32", show_default=True, metavar="WxH", help="Reject images smaller than this.")
@click.option("--max-pixels", type=click.IntRange(1), default=89_478_485, show_default=True,
              help="Reject images with more pixels (decompression bombs).")
@click.option("--max-aspect", type=FINITE_AT_LEAST_ONE, default=10.0, show_default=True,
              help="Reject images whose long side is more than this many times the short side.")
@click.option("--animated", type=click.Choice(["reject", "first-frame"]), default="reject", show_default=True,
              help="Reject animations, or keep them (training uses the first frame).")
@click.option("--recheck", is_flag=True, help="Check ok and rejected images again too (after changing the rules).")
@click.option("--prune", is_flag=True, help="Then remove the files of rejected images (rows stay, status deleted).")
@click.option("--workers", type=click.IntRange(1, 256), help="Worker processes [default: all cores].")
@budget_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_options
def verify(opts: Options, label: str | None, min_size: str, max_pixels: int, max_aspect: float, animated: str,
           recheck: bool, prune: bool, workers: int | None, file_timeout: float, file_memory: int,
           as_json: bool) -> None:
    """Fully decode unverified images; mark each ok or rejected with its reason."""
    from fastclass.curate.verify import VerifyRules, parse_size, prune_rejected, verify_images

    width, height = parse_size(min_size)
    rules = VerifyRules(width, height, max_pixels, max_aspect, animated)
    update, finish = progress_reporter(opts, "Verifying")
    try:
        with opts.session() as (catalog, session):
            result = verify_images(session, catalog.store, rules, label=label, recheck=recheck,
                                   workers=workers, progress=update,
                                   budget=make_budget(file_timeout, file_memory))
            finish()
            if prune:
                result.pruned = prune_rejected(session, catalog.store)
    finally:
        finish()
    if as_json:
        echo_json(result.as_dict())
        return
    click.echo(f"Checked {result.checked} image(s): {result.ok} ok, {sum(result.rejected.values())} rejected.")
    for reason, count in result.rejected.most_common():
        click.echo(f"  {count:6d}  {reason}")
    if result.pruned is not None:
        _echo_prune(result.pruned)


@cli.command()
@click.option("--threshold", type=click.IntRange(0, 32), default=10, show_default=True,
              help="Largest Hamming distance (of 64 bits) between near-duplicates.")
@click.option("--hash", "hash_kind", type=click.Choice(["phash", "dhash"]), default="phash", show_default=True)
@click.option("--flip", is_flag=True, help="Also match left-right mirrored copies.")
@click.option("--label", metavar="NAME", help="Only images of this label (conflicts cannot be seen then).")
@click.option("--dry-run", is_flag=True, help="Report the groups without changing the catalog.")
@click.option("--conflicts", "show_conflicts", is_flag=True,
              help="List the open label conflicts (claims and near-copies under two labels) and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_options
def dedup(opts: Options, threshold: int, hash_kind: str, flip: bool, label: str | None, dry_run: bool,
          show_conflicts: bool, as_json: bool) -> None:
    """Group near-duplicate images; mark all but one keeper per group duplicate; find label conflicts."""
    from fastclass.curate.dedup import find_near_duplicates, list_conflicts

    with opts.session() as (_, session):
        if show_conflicts:
            conflicts = list_conflicts(session)
        else:
            result = find_near_duplicates(session, threshold, hash_kind, flip, label, dry_run)
    if show_conflicts:
        if as_json:
            echo_json(conflicts)
            return
        from fastclass.text import printable

        click.echo(f"{len(conflicts)} open label conflict(s); settle each with `fastclass clean --status conflict`:")
        for item in conflicts:
            if item["kind"] == "labels":
                click.echo(f"  image {item['image']} (label {item['label']}, {item['status']}): sources claim "
                           + ", ".join(sorted({c['label'] for c in item["claims"]})))
                for claim in item["claims"]:
                    how = f"{claim['engine']}" + (f" job {claim['crawl_job']}" if claim["crawl_job"] else "")
                    click.echo(printable(f"    {claim['label']}: {how} {claim['uri']}"))
            else:
                members = ", ".join(f"image {m['image']} ({m['label']}, {m['size']})" for m in item["members"])
                click.echo(f"  near-duplicate group {item['group']}: {members}")
        return
    if as_json:
        echo_json(result.as_dict())
        return
    prefix = "Would find" if dry_run else "Found"
    click.echo(f"{prefix} {result.groups} group(s) of near-duplicates among {result.images} image(s): "
               f"{result.members} member(s), {result.duplicates} marked duplicate, "
               f"{result.conflicts} label conflict(s) (see `fastclass dedup --conflicts`).")
    if result.decided:
        click.echo(f"  {result.decided} group(s) hold reviewed images, left as the reviewer decided.")
    for lab, count in sorted(result.duplicates_per_label.items()):
        click.echo(f"  {lab}: {count} duplicate(s)")


@cli.command()
@click.option("--valid-pct", type=float, metavar="FRACTION",
              help="Share of each label's images in valid [default: the current split's, else 0.2].")
@click.option("--seed", type=SEED, help="Seed of the assignment [default: the current split's, else 42].")
@click.option("--min-valid", type=COUNT_OR_ZERO, help="At least this many valid images per label that can spare "
              "them [default: the current split's, else 1].")
@click.option("--new", "new_split", is_flag=True, help="Start a new split with these settings instead of "
              "extending the current one (old assignments are kept for the snapshots made with them).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
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
@click.option("--json", "as_json", is_flag=True, help="Print the snapshot as JSON.")
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
@click.option("--json", "as_json", is_flag=True, help="Print the snapshots as JSON.")
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
@click.option("--json", "as_json", is_flag=True, help="Print the snapshot as JSON.")
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
@click.option("--json", "as_json", is_flag=True, help="Print the differences as JSON.")
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
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
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


def _parse_bytes(text: str) -> int:
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?)i?b?\s*", text.lower())
    if not match:
        raise click.BadParameter(f"{text!r} is not a size such as 20MB, 500KB or 1048576")
    return int(float(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[match.group(2)])


@cli.command()
@click.argument("query", required=False)
@click.option("--label", metavar="NAME", help="Label of the images [default: the query, spaces to underscores].")
@click.option("--engine", "engines", multiple=True, metavar="NAME",
              help="bing, baidu, google, flickr, greedy or urls (repeatable) [default: bing, baidu, google; "
                   "greedy with --url, urls with --urls].")
@click.option("--max", "max_new", type=COUNT, default=100, show_default=True,
              help="Stop when the class has this many new images from this run.")
@click.option("--min-size", metavar="WxH", help="Skip images smaller than this (not stored).")
@click.option("--threads", type=click.IntRange(1, 256), default=8, show_default=True, help="Parallel downloads.")
@click.option("--per-host", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Parallel downloads from one host at most.")
@click.option("--filter", "filters", multiple=True, metavar="KEY=VALUE",
              help="Engine search filter, e.g. type=photo, size=large, license=commercial (repeatable).")
@click.option("--url", "pages", multiple=True, metavar="PAGE", help="A page for the greedy engine (repeatable).")
@click.option("--urls", "urls_file", type=click.Path(path_type=Path), help="A file of image URLs, one per line.")
@click.option("--engine-url", "engine_urls", multiple=True, metavar="ENGINE=BASE_URL",
              help="Send an engine's requests to a mirror, proxy or test server (repeatable).")
@click.option("--from", "from_csv", type=click.Path(path_type=Path), metavar="FILE.csv",
              help="One class per row: the fastclass CSV format (searchterm,exclude[,label]).")
@click.option("--resume", is_flag=True, help="Run again every class whose last crawl was interrupted.")
@click.option("--timeout", type=click.FloatRange(0.1), default=10.0, show_default=True,
              help="Seconds to wait for a server to answer or send more data.")
@click.option("--max-bytes", default="20MB", show_default=True, help="Skip files larger than this.")
@click.option("--retries", type=click.IntRange(0, 10), default=3, show_default=True,
              help="Retries after 429/503 (honouring Retry-After) and connection errors.")
@click.option("--max-failures", type=click.IntRange(1), default=30, show_default=True,
              help="Stop an engine after this many downloads in a row failed.")
@click.option("--queue", "enqueue", is_flag=True,
              help="Only queue the job(s), for `fastclass worker`s on any machine to run.")
@click.option("--allow-private", is_flag=True,
              help="Also fetch from loopback, private and link-local addresses (intranets, local test servers).")
@click.option("--json", "as_json", is_flag=True, help="Print the job record(s) as JSON.")
@pass_options
def crawl(opts: Options, query: str | None, label: str | None, engines: tuple[str, ...], max_new: int,
          min_size: str | None, threads: int, per_host: int, filters: tuple[str, ...], pages: tuple[str, ...],
          urls_file: Path | None, engine_urls: tuple[str, ...], from_csv: Path | None, resume: bool, timeout: float,
          max_bytes: str, retries: int, max_failures: int, enqueue: bool, allow_private: bool,
          as_json: bool) -> None:
    """Crawl web images for one class (QUERY), every class of a CSV (--from), or unfinished crawls (--resume)."""
    from fastclass.crawl.crawler import run_crawl
    from fastclass.crawl.engines import DEFAULT_ENGINES
    from fastclass.crawl.jobs import jobs_to_resume
    from fastclass.crawl.options import CrawlOptions, label_from_query, parse_engine_urls, parse_filters, read_class_csv
    from fastclass.curate.verify import parse_size

    if sum(bool(x) for x in (query, from_csv, resume)) > 1:
        raise click.UsageError("give one of QUERY, --from FILE.csv or --resume")
    if enqueue and resume:
        raise click.UsageError("--queue and --resume cannot be used together (workers retry queued jobs themselves)")
    if enqueue and allow_private:
        raise click.UsageError("--allow-private is the worker's choice: pass it to `fastclass worker`, not --queue")
    engine_list = list(engines) or (["greedy"] if pages else ["urls"] if urls_file else list(DEFAULT_ENGINES))
    if not (query or from_csv or resume or pages or urls_file):
        raise click.UsageError("give a QUERY, --from FILE.csv, --resume, --url PAGE or --urls FILE")

    def options_for(text: str, name: str) -> CrawlOptions:
        return CrawlOptions(
            query=text, label=name, engines=engine_list, max_new=max_new,
            min_size=parse_size(min_size) if min_size else None, threads=threads, per_host=per_host,
            filters=parse_filters(list(filters)), pages=list(pages),
            urls_file=str(urls_file.resolve()) if urls_file else None,
            engine_urls=parse_engine_urls(list(engine_urls)), max_bytes=_parse_bytes(max_bytes), timeout=timeout,
            retries=retries, max_failures=max_failures)

    bad_rows: list[str] = []
    reports = []
    with opts.session() as (catalog, session):
        if resume:
            planned = [(job_id, options) for job_id, options in jobs_to_resume(session)]
            if not planned:
                click.echo("Nothing to resume: every crawl finished.", err=True)
        elif from_csv:
            rows, bad_rows = read_class_csv(from_csv)
            for message in bad_rows:
                click.echo(f"Warning: {message}", err=True)
            planned = [(None, options_for(row.query, row.label)) for row in rows]
        else:
            from fastclass.curate.labels import normalize_label

            text = query or ""
            name = normalize_label(label) if label else label_from_query(text) if text else None
            if name is None:
                raise click.UsageError("--label is needed when there is no QUERY")
            planned = [(None, options_for(text, name))]
        log_dir = catalog.work_dir / "logs"
        if enqueue:
            from fastclass.crawl.jobqueue import enqueue_crawl

            queued = [(enqueue_crawl(session, options), options) for _, options in planned]
            planned = []
        for resumed_from, options in planned:
            update, finish = progress_reporter(opts, f"Crawling {options.label}")
            try:
                reports.append(run_crawl(session, catalog.store, options, log_dir, update, resumed_from,
                                         allow_private=allow_private))
            finally:
                finish()
            if not as_json:
                _echo_crawl(reports[-1], options.max_new)
    if enqueue:
        if as_json:
            echo_json([{"id": job_id, "label": o.label, "query": o.query, "status": "queued"} for job_id, o in queued])
        for job_id, options in [] if as_json else queued:
            click.echo(f"Queued crawl job {job_id}: {options.label}" + (f" ({options.query!r})" if options.query else ""))
    elif as_json:
        echo_json(reports[0].as_dict() if len(reports) == 1 and not (from_csv or resume)
                  else [r.as_dict() for r in reports])
    if bad_rows:
        raise click.ClickException(f"{len(bad_rows)} bad row(s) in {from_csv} (listed above); "
                                   "the other classes were crawled")


def _echo_crawl(report, max_new: int) -> None:
    from fastclass.text import printable

    query = f" ({report.query!r})" if report.query else ""
    click.echo(f"Crawl job {report.job_id} {report.status}: {report.label}{query}: "
               f"{report.new_images} new of --max {max_new}, {report.exact_duplicates} already known, "
               f"{sum(report.rejected.values())} rejected, {sum(report.failed.values())} failed, "
               f"{report.skipped} skipped as fetched before; {report.seconds:.1f} s")
    if report.conflicts:
        click.echo(f"  {report.conflicts} image(s) were already in the catalog under another label: recorded as "
                   "label conflicts (`fastclass clean --status conflict`)")
    click.echo(f"  {'engine':8s} {'found':>6s} {'skipped':>8s} {'fetched':>8s} {'new':>5s} {'dupes':>6s} {'failed':>7s}")
    for name, stats in report.engines.items():
        click.echo(f"  {name:8s} {stats.found:6d} {stats.skipped:8d} {stats.downloaded:8d} {stats.new:5d} "
                   f"{stats.duplicates:6d} {stats.failed:7d}")
    for reason, count in (report.rejected + report.failed).most_common():
        click.echo(printable(f"  {count:6d}  {reason}"))
    for problem in report.problems:
        click.echo(printable(f"Warning: {problem}"), err=True)


@cli.command()
@click.option("--limit", type=COUNT, help="Only the newest N jobs.")
@click.option("--json", "as_json", is_flag=True, help="Print the jobs as JSON.")
@pass_options
def jobs(opts: Options, limit: int | None, as_json: bool) -> None:
    """Crawl jobs, newest first: query, label, status and counts."""
    from fastclass.crawl.jobs import list_jobs
    from fastclass.text import printable

    with opts.session() as (_, session):
        rows = list_jobs(session, limit)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("No crawl jobs yet.")
    for row in rows:
        worker = f"  worker {row['worker']} (attempt {row['attempts']})" if row["worker"] else ""
        click.echo(f"{row['id']:5d} {row['status']:11s} {str(row['label'])[:24]:24s} new {row['new']:5d}/"
                   f"{row['max'] or '?'}  found {row['found']:5d}  dupes {row['exact_duplicates']:4d}  "
                   f"rejected {row['rejected']:4d}  [{row['engines']}] {row['started_at']:%Y-%m-%d %H:%M}{worker}"
                   + (f"\n      last error: {printable(row['last_error'])}" if row['last_error'] else ""))


@cli.command()
@click.option("--concurrency", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Crawl jobs run at once by this worker.")
@click.option("--name", metavar="NAME", help="This worker's name in `fastclass jobs` [default: host:pid].")
@click.option("--lease", type=click.FloatRange(3), default=60.0, show_default=True,
              help="Seconds a job stays claimed without a heartbeat before another worker may take it over.")
@click.option("--poll", type=click.FloatRange(0.1), default=2.0, show_default=True,
              help="Seconds between looks at an empty queue.")
@click.option("--until-empty", is_flag=True, help="Stop when no job is queued or running anywhere.")
@click.option("--allow-private", is_flag=True,
              help="Let this worker's jobs fetch from loopback, private and link-local addresses.")
@click.option("--json", "as_json", is_flag=True, help="At the end, print the jobs this worker ran as JSON.")
@pass_options
def worker(opts: Options, concurrency: int, name: str | None, lease: float, poll: float, until_empty: bool,
           allow_private: bool, as_json: bool) -> None:
    """Run queued crawl jobs (`crawl --queue`) from the catalog; start any number, on any machine."""
    from fastclass.crawl.jobqueue import run_worker

    def on_job(report) -> None:
        if not as_json:
            click.echo(f"Crawl job {report.job_id} {report.status}: {report.label}: {report.new_images} new, "
                       f"{report.exact_duplicates} already known, {sum(report.rejected.values())} rejected, "
                       f"{sum(report.failed.values())} failed; {report.seconds:.1f} s")

    catalog = opts.open()
    try:
        result = run_worker(catalog, catalog.work_dir / "logs", name, concurrency, lease, poll,
                            until_empty, on_job, allow_private)
    finally:
        catalog.close()
    if as_json:
        echo_json(result.as_dict())
    for message in result.errors:
        click.echo(f"Warning: {message}", err=True)


@cli.command()
@click.option("--label", metavar="NAME", help="Only images of this label.")
@click.option("--status", type=click.Choice(["ok", "pending", "duplicate", "conflict", "rejected", "deleted"]),
              default="ok", show_default=True, help="Which images: by status, or the members of label conflicts.")
@click.option("--order", type=click.Choice(["label", "random", "newest", "loss"]), default="label",
              show_default=True, help="Review order (loss: highest training loss first, needs --run).")
@click.option("--run", metavar="RUN", help="A training run whose predictions and losses to show.")
@click.option("--apply", "apply_file", type=click.Path(path_type=Path), metavar="FILE.csv",
              help="No prompt: apply the decisions in FILE.csv (image,action,label).")
@click.option("--create-labels", is_flag=True, help="With --apply: relabel rows may name labels that do not exist yet.")
@click.option("--json", "as_json", is_flag=True, help="With --apply: print the result as JSON.")
@pass_options
def clean(opts: Options, label: str | None, status: str, order: str, run: str | None, apply_file: Path | None,
          create_labels: bool, as_json: bool) -> None:
    """Review images one key at a time: keep, delete, relabel; every decision is saved at once."""
    from fastclass.curate.review import apply_csv, review_queue, reviewer_name, run_with_losses

    if apply_file is not None:
        with opts.session() as (catalog, session):
            result = apply_csv(session, catalog.store, apply_file, create_labels=create_labels)
        if as_json:
            echo_json(result.as_dict())
        else:
            click.echo(f"Applied {result.applied} decision(s) from {apply_file}.")
        for message in result.errors:
            click.echo(f"Warning: {message}", err=True)
        if result.errors:
            raise click.ClickException(f"{len(result.errors)} bad row(s) in {apply_file} were left out (listed above)")
        return
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise click.ClickException("clean needs a terminal; in scripts use `fastclass clean --apply decisions.csv`, "
                                   "`fastclass label set` or `fastclass delete`")
    from fastclass.cli.prompt import CleanPrompt, terminal_keys
    from fastclass.curate.labels import relabel_digits
    from fastclass.stats import list_labels

    with opts.session() as (catalog, session):
        queue = review_queue(session, label, status, order, run)
        if not queue:
            click.echo(f"No images with status {status}" + (f" in label {label}" if label else "") + " to review.")
            return
        labels = [row["name"] for row in list_labels(session)]
        with terminal_keys() as read_key:
            stats = CleanPrompt(session, catalog.store, queue, labels, reviewer_name(), read_key,
                                run_id=run_with_losses(session, run) if run else None,
                                digits=relabel_digits(session)).run()
    counts = stats.counts
    click.echo(f"Saved: {counts['keep']} kept, {counts['delete']} deleted, {counts['relabel']} relabelled, "
               f"{counts['undo']} undone this session.")


@cli.command()
@click.option("--image", "image_ref", metavar="ID|SHA", help="Only the reviews of this image.")
@click.option("--limit", type=COUNT, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the reviews as JSON.")
@pass_options
def reviews(opts: Options, image_ref: str | None, limit: int, as_json: bool) -> None:
    """Review decisions, newest first (the history is never rewritten)."""
    from fastclass.curate.review import find_image, list_reviews

    with opts.session() as (_, session):
        image_id = find_image(session, image_ref).id if image_ref else None
        rows = list_reviews(session, limit, image_id)
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        change = (f"label {r['old_label']} -> {r['new_label']}" if r["old_label"] != r["new_label"]
                  else f"status {r['old_status']} -> {r['new_status']}")
        undoes = f" (undoes {r['undoes']})" if r["undoes"] else ""
        click.echo(f"{r['id']:6d} {r['created_at']:%Y-%m-%d %H:%M:%S} {r['reviewer'][:12]:12s} image {r['image']:<7d} "
                   f"{r['action']:8s} {change}{undoes}")


@cli.command("undo")
@click.argument("review_id", type=ROW_ID)
@pass_options
def undo_(opts: Options, review_id: int) -> None:
    """Undo one review decision (recorded as a new review; nothing is erased)."""
    from fastclass.curate.review import undo

    with opts.session() as (catalog, session):
        decision = undo(session, catalog.store, review_id)
    click.echo(f"Undid review {review_id}: image {decision.image_id} is {decision.new_status}, "
               f"label {decision.new_label} again (review {decision.review_id}).")


@cli.group()
def label() -> None:
    """Labels as objects: set on images, rename, merge, delete, history."""


@label.command("set")
@click.argument("name")
@click.argument("images", nargs=-1, required=True, metavar="IMAGE...")
@click.option("--create", is_flag=True, help="NAME may be a new label (else a typo is refused with a suggestion).")
@pass_options
def label_set(opts: Options, name: str, images: tuple[str, ...], create: bool) -> None:
    """Relabel images (ids or sha256) to NAME; all or none."""
    from fastclass.curate.labels import did_you_mean, label_exists, normalize_label, unknown_label
    from fastclass.curate.review import decide_many

    with opts.session() as (catalog, session):
        if not create and not label_exists(session, normalize_label(name)):
            hint = did_you_mean(session, normalize_label(name))
            if not sys.stdin.isatty() or not click.confirm(f"Label {name!r} does not exist{hint} Create it?"):
                raise unknown_label(session, name, "add --create to create it")
        count = decide_many(session, catalog.store, images, "relabel", name, create_label=True)
    click.echo(f"Relabelled {count} image(s) to {name}.")


@label.command("rename")
@click.argument("old")
@click.argument("new")
@pass_options
def label_rename(opts: Options, old: str, new: str) -> None:
    """Rename a label; its images, sources, relabel digit and history stay with it."""
    from fastclass.curate.labels import rename_label
    from fastclass.curate.review import reviewer_name

    with opts.session() as (_, session):
        change = rename_label(session, old, new, reviewer_name())
    click.echo(f"Renamed label {change.old} to {change.new} ({change.images} image(s)).")


@label.command("merge")
@click.argument("source")
@click.argument("target")
@pass_options
def label_merge(opts: Options, source: str, target: str) -> None:
    """Move every image and claim of SOURCE to TARGET and retire SOURCE."""
    from fastclass.curate.labels import merge_labels
    from fastclass.curate.review import reviewer_name

    with opts.session() as (_, session):
        change = merge_labels(session, source, target, reviewer_name())
    click.echo(f"Merged label {change.old} into {change.new}: {change.images} image(s) relabelled "
               f"(each undoable with `fastclass undo`), {change.sources} source claim(s) moved.")


@label.command("delete")
@click.argument("name")
@click.option("--force", is_flag=True, help="Also when images carry it: they are marked deleted (undoable).")
@pass_options
def label_delete(opts: Options, name: str, force: bool) -> None:
    """Retire a label that no image carries (or, with --force, mark its images deleted)."""
    from fastclass.curate.labels import delete_label
    from fastclass.curate.review import reviewer_name

    with opts.session() as (_, session):
        change = delete_label(session, name, reviewer_name(), force)
    click.echo(f"Deleted label {change.old}: {change.deleted_images} image(s) marked deleted, "
               f"{change.sources} claim(s) by other images dropped.")


@label.command("history")
@click.option("--limit", type=COUNT, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the history as JSON.")
@pass_options
def label_history_(opts: Options, limit: int, as_json: bool) -> None:
    """Renames, merges and deletions of labels, newest first."""
    from fastclass.curate.labels import label_history

    with opts.session() as (_, session):
        rows = label_history(session, limit)
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        change = f"{r['old']} -> {r['new']}" if r["new"] else r["old"]
        click.echo(f"{r['id']:5d} {r['created_at']:%Y-%m-%d %H:%M:%S} {r['reviewer'][:12]:12s} {r['action']:7s} "
                   f"{change} ({r['images']} image(s)){'; ' + r['detail'] if r['detail'] else ''}")


@cli.command()
@click.argument("images", nargs=-1, required=True, metavar="IMAGE...")
@pass_options
def delete(opts: Options, images: tuple[str, ...]) -> None:
    """Mark images (ids or sha256) deleted; their files go with the next `fastclass prune`."""
    from fastclass.curate.review import decide_many

    with opts.session() as (catalog, session):
        count = decide_many(session, catalog.store, images, "delete")
    click.echo(f"Deleted {count} image(s) (undo with `fastclass undo`; files stay until `fastclass prune`).")


@cli.command()
@click.argument("ref", metavar="ID|SHA256|URL")
@click.option("--json", "as_json", is_flag=True, help="Print the story as JSON.")
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
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
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


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_options
def prune(opts: Options, as_json: bool) -> None:
    """Remove the files of deleted and rejected images from the store (not those a snapshot holds)."""
    from fastclass.curate.verify import prune_rejected

    with opts.session() as (catalog, session):
        result = prune_rejected(session, catalog.store)
    if as_json:
        echo_json(result.as_dict())
        return
    _echo_prune(result)


def _echo_prune(result) -> None:
    click.echo(f"Pruned: removed {result.removed} file(s) of deleted or rejected images from the store.")
    for snap, count in sorted(result.held.items()):
        click.echo(f"  kept {count} file(s) that snapshot {snap} holds")


def _runs_root(catalog) -> Path:
    return catalog.work_dir / "runs"


def _parse_sizes(size: int, sizes: str | None) -> tuple[int, ...]:
    if sizes is None:
        return (size,)
    try:
        parsed = tuple(int(part) for part in sizes.split(",") if part.strip())
    except ValueError:
        parsed = ()
    if not parsed:
        raise click.BadParameter(f"{sizes!r} is not a list of sizes such as 224,448", param_hint="--sizes")
    return parsed


def _parse_lr(text: str) -> float | None:
    if text.strip().lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is neither a number nor auto", param_hint="--lr") from None


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


EPOCH_HEADER = (f"{'epoch':>5s} {'phase':9s} {'size':>5s} {'train_loss':>10s} {'valid_loss':>10s} "
                f"{'error_rate':>10s} {'accuracy':>8s} {'time':>8s} {'img/s':>8s}")


def _epoch_line(row) -> str:
    return (f"{row.epoch:5d} {row.phase:9s} {row.size:5d} {_fmt(row.train_loss, 6):>10s} {_fmt(row.valid_loss, 6):>10s} "
            f"{_fmt(row.error_rate, 6):>10s} {_fmt(row.accuracy, 4):>8s} {row.seconds:7.1f}s {row.images_per_s:8.1f}")


@cli.command()
@click.option("--snapshot", "snapshot_name", required=True, metavar="NAME", help="The snapshot to train on.")
@click.option("--arch", default="resnet34", show_default=True,
              help="Architecture: resnet18/34/50/101/152, densenet, efficientnet, convnext, ... or a timm model name.")
@click.option("--pretrained/--no-pretrained", default=True, show_default=True,
              help="Start from ImageNet weights (downloaded once into torch's cache) or from random ones.")
@click.option("--weights", "weights_file", type=click.Path(path_type=Path), metavar="FILE",
              help="Start from a local state_dict or checkpoint of --arch (for machines without network).")
@click.option("--epochs", type=click.IntRange(0, 100_000), default=4, show_default=True, help="Epochs with the whole network.")
@click.option("--freeze-epochs", type=click.IntRange(0, 100_000), default=1, show_default=True,
              help="First epochs training only the new head.")
@click.option("--lr", "lr_text", default="2e-3", show_default=True, metavar="LR|auto",
              help="Peak learning rate, or auto for lr_find's suggestion.")
@click.option("--lr-mult", type=float, default=100.0, show_default=True,
              help="The earliest layers learn at lr/lr-mult (discriminative learning rates).")
@click.option("--fp16/--no-fp16", default=None, help="Mixed precision [default: on with a GPU].")
@click.option("--size", type=click.IntRange(8), default=224, show_default=True, help="Training image size.")
@click.option("--sizes", metavar="S1,S2,...", help="Progressive resizing, e.g. 224,448: --epochs more at each further size.")
@click.option("--halve-bs", is_flag=True, help="With --sizes: halve the batch size at each further size.")
@click.option("--presize", type=click.IntRange(8), help="Item resize before batch augmentation [default: 2.05 x size].")
@click.option("--no-flip", is_flag=True, help="No left-right flips (for classes where left and right matter).")
@click.option("--bs", type=click.IntRange(1), default=64, show_default=True, help="Batch size.")
@click.option("--workers", type=click.IntRange(0, 256), envvar="FASTCLASS_WORKERS",
              help="Data loading processes [env FASTCLASS_WORKERS; default: cores up to 16 on a GPU, 0 on the CPU].")
@click.option("--tta", is_flag=True, help="Also report test-time-augmentation accuracy on valid at the end.")
@click.option("--seed", type=SEED, default=42, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              envvar="FASTCLASS_DEVICE", help="Where to train [env FASTCLASS_DEVICE].")
@click.option("--cache/--no-cache", default=None,
              help="Decode and presize every image once into cache/ beside runs/ [default: on with a GPU].")
@click.option("--nproc", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Processes (one per GPU) for distributed data-parallel training, launched with torchrun.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_options
def train(opts: Options, snapshot_name: str, arch: str, pretrained: bool, weights_file: Path | None, epochs: int,
          freeze_epochs: int, lr_text: str, lr_mult: float, fp16: bool | None, size: int, sizes: str | None,
          halve_bs: bool, presize: int | None, no_flip: bool, bs: int, workers: int | None, tta: bool, seed: int,
          device: str, cache: bool | None, nproc: int, as_json: bool) -> None:
    """Fine-tune a CNN on a snapshot; the run and every epoch are recorded in the catalog."""
    if weights_file is not None and not pretrained:
        raise click.UsageError("--weights and --no-pretrained contradict each other")
    from trainer.archs import NO_WEIGHTS, PRETRAINED
    from trainer.train import TrainConfig, TrainHooks, train_snapshot

    weights = str(weights_file.resolve()) if weights_file else PRETRAINED if pretrained else NO_WEIGHTS
    config = TrainConfig(snapshot_name, arch, weights, epochs, freeze_epochs, _parse_lr(lr_text), lr_mult, fp16,
                         _parse_sizes(size, sizes), presize, halve_bs, not no_flip, bs, workers, tta, seed, device, cache)
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        config.check(nproc)
        _launch_processes(click.get_current_context(), opts, nproc)
        return
    # Under torchrun only the first process reports; the others train their share of each batch.
    rank = int(os.environ.get("RANK", 0))
    update, finish = progress_reporter(opts, "Training") if rank == 0 else (None, lambda: None)
    talk = not (as_json or opts.quiet) and rank == 0

    def on_start(result) -> None:
        if talk:
            click.echo(f"Run {result.run_id}: {result.arch} on snapshot {result.snapshot} ({result.train_images} train"
                       f" / {result.valid_images} valid, {len(result.labels)} labels) on {result.device}")
            click.echo(f"  weights: {result.weights}; artifacts in {result.artifact_dir}")

    def on_lr(lr: float) -> None:
        if talk:
            click.echo(f"  lr_find suggests lr {lr:.2e}")

    def on_epoch(row) -> None:
        if talk:
            finish()
            if row.epoch == 0:
                click.echo(EPOCH_HEADER)
            click.echo(_epoch_line(row))

    try:
        with opts.session() as (catalog, session):
            result = train_snapshot(session, catalog.store, config, _runs_root(catalog),
                                    TrainHooks(update, on_start, on_lr, on_epoch))
    finally:
        finish()
    if rank:
        return
    if as_json:
        echo_json(result.as_dict())
        return
    tta_text = f", TTA accuracy {result.tta_accuracy:.4f}" if result.tta_accuracy is not None else ""
    click.echo(f"Run {result.run_id} done in {result.seconds:.1f} s: valid loss {_fmt(result.valid_loss)}, "
               f"accuracy {_fmt(result.accuracy)}{tta_text}; model {result.artifact_dir / 'export.pkl'}")


def _launch_processes(ctx: click.Context, opts: Options, nproc: int) -> None:
    """Run this same train command in nproc processes under torchrun (one machine); exit with its status."""
    import subprocess

    args = ["--catalog", opts.location] + (["-v"] if opts.verbose else ["-q"] if opts.quiet else []) + ["train"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name == "nproc" or value is None or not isinstance(param, click.Option):
            continue
        if param.is_flag and param.secondary_opts:
            args.append(param.opts[0] if value else param.secondary_opts[0])
        elif param.is_flag:
            if value:
                args.append(param.opts[0])
        else:
            args += [param.opts[0], str(value.resolve() if isinstance(value, Path) else value)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "fastclass", *args]
    log.debug("launching: %s", " ".join(command))
    ctx.exit(subprocess.run(command).returncode)


@cli.group(invoke_without_command=True)
@click.option("--limit", type=COUNT, help="Only the newest N runs.")
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON.")
@click.pass_context
def runs(ctx: click.Context, limit: int | None, as_json: bool) -> None:
    """Training runs, newest first: snapshot, architecture, status and final metrics."""
    if ctx.invoked_subcommand is not None:
        return
    from trainer.runs import list_runs

    with ctx.find_object(Options).session() as (_, session):
        rows = list_runs(session, limit)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("No training runs yet; start one with `fastclass train --snapshot NAME`.")
    for row in rows:
        tta = f" tta {row['tta_accuracy']:.4f}" if row["tta_accuracy"] is not None else ""
        click.echo(f"{row['id']:5d} {row['status']:11s} {row['arch'][:22]:22s} {row['snapshot'][:20]:20s} "
                   f"epochs {row['epochs']:3d}  valid_loss {_fmt(row['valid_loss'])}  accuracy {_fmt(row['accuracy'])}"
                   f"{tta}  {row['started_at']:%Y-%m-%d %H:%M}  {row['seconds']:.0f} s"
                   + (f"\n      error: {row['error']}" if row["error"] else ""))


@runs.command("show")
@click.argument("run_id", metavar="RUN")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON.")
@pass_options
def runs_show(opts: Options, run_id: str, as_json: bool) -> None:
    """One run: config, code version, device, and every epoch's metrics."""
    from trainer.runs import show_run

    with opts.session() as (_, session):
        data = show_run(session, run_id)
    if as_json:
        echo_json(data)
        return
    click.echo(f"Run {data['id']} ({data['status']}): {data['arch']} on snapshot {data['snapshot']} "
               f"({data['snapshot_digest'][:12]})")
    click.echo(f"  device   {data['device']} on {data['host']}; fastclass {data['code_version']}")
    click.echo(f"  started  {data['started_at']:%Y-%m-%d %H:%M:%S} UTC, {data['seconds']:.1f} s")
    click.echo(f"  weights  {data['config'].get('weights_loaded')}")
    config = data["config"]
    click.echo("  config   " + " ".join(f"{k}={config[k]}" for k in ("epochs", "freeze_epochs", "lr", "lr_mult", "sizes",
                                                                     "bs", "fp16", "flip", "tta", "seed")
                                        if k in config))
    click.echo(f"  result   valid_loss {_fmt(data['valid_loss'])}  accuracy {_fmt(data['accuracy'])}"
               + (f"  tta_accuracy {data['tta_accuracy']:.4f}" if data["tta_accuracy"] is not None else ""))
    if data["error"]:
        click.echo(f"  error    {data['error']}")
    click.echo(f"  artifacts {data['artifact_dir']}")
    if data["epoch_rows"]:
        click.echo(EPOCH_HEADER)
        from types import SimpleNamespace

        for row in data["epoch_rows"]:
            click.echo(_epoch_line(SimpleNamespace(**row)))


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), metavar="DIR",
              help="Where to write the reports [default: the run's folder/interpret].")
@click.option("--top", type=click.IntRange(1), default=20, show_default=True, help="How many top losses to list.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              envvar="FASTCLASS_DEVICE")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_options
def interpret(opts: Options, run_id: str, out_dir: Path | None, top: int, device: str, as_json: bool) -> None:
    """Confusion matrix, most-confused pairs, per-class accuracy and top losses of a run (losses kept for clean)."""
    from trainer.interpret import interpret_run

    with opts.session() as (catalog, session):
        result = interpret_run(session, catalog.store, run_id, out_dir, top, device)
    if as_json:
        echo_json(result.as_dict())
        return
    click.echo(f"Run {result.run_id}: valid accuracy {result.valid_accuracy:.4f} on {result.valid_images} image(s); "
               f"losses of all {result.images} image(s) stored (`fastclass clean --order loss --run {result.run_id}`).")
    click.echo(f"{'label':30s} {'valid':>6s} {'correct':>8s} {'accuracy':>9s}")
    for row in result.per_class:
        click.echo(f"{row['label'][:30]:30s} {row['valid']:6d} {row['correct']:8d} {_fmt(row['accuracy']):>9s}")
    if result.most_confused:
        click.echo("Most confused (actual -> predicted):")
        for row in result.most_confused[:10]:
            click.echo(f"  {row['count']:5d}  {row['actual']} -> {row['predicted']}")
    click.echo(f"Top {len(result.top_losses)} losses:")
    for row in result.top_losses:
        click.echo(f"  image {row['image']:<7d} {row['split']:5s} {row['label'][:20]:20s} predicted "
                   f"{row['predicted'][:20]:20s} p={row['probability']:.3f} loss {row['loss']:.3f}")
    click.echo(f"Reports in {result.out_dir}: " + ", ".join(sorted(Path(f).name for f in result.files.values())))


@cli.command()
@click.argument("run_ref", metavar="RUN")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="IMAGE_OR_DIR...")
@click.option("--tta", is_flag=True, help="Average the predictions over test-time augmentations.")
@click.option("--top", "top_k", type=click.IntRange(1), default=3, show_default=True, help="Classes listed per image.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              envvar="FASTCLASS_DEVICE")
@click.option("--json", "as_json", is_flag=True, help="Print the predictions as JSON.")
@pass_options
def predict(opts: Options, run_ref: str, images: tuple[Path, ...], tta: bool, top_k: int, device: str,
            as_json: bool) -> None:
    """Class and probability per image. RUN is a run id of the catalog, or the path of a run folder (or its
    export.pkl; write ./1 for a folder named 1), which needs no catalog."""
    from trainer.predict import predict_images

    if run_ref.isdigit():
        # A run id, always: a folder that happens to be named like one (class folders 0-9) must not decide
        # which pickle runs. Give a folder as a path (./1) to use it.
        from trainer.runs import get_run

        with opts.session() as (_, session):
            run_path = Path(get_run(session, run_ref).artifact_dir)
    else:
        run_path = Path(run_ref)
        if not run_path.exists():
            raise click.BadParameter(f"{run_ref!r} is neither a run id nor a run folder", param_hint="RUN")
    results = predict_images(run_path, list(images), tta, device, top_k)
    failed = [r for r in results if r.error]
    if as_json:
        echo_json([r.as_dict() for r in results])
    else:
        for r in results:
            if r.error is None:
                others = "  ".join(f"{name} {p:.3f}" for name, p in r.top[1:])
                click.echo(f"{r.path}\t{r.label}\t{r.probability:.4f}" + (f"\t({others})" if others else ""))
    for r in failed:
        click.echo(f"Warning: {r.path}: {r.error}; skipped", err=True)
    if failed and len(failed) == len(results):
        raise click.ClickException("none of the files is an image that can be decoded")


def main() -> None:
    cli(prog_name="fastclass")


if __name__ == "__main__":
    main()
