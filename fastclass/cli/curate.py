"""Curating: verify, dedup, the review prompt and its history, labels as objects, delete and prune."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from fastclass.cli import (
    COUNT,
    FINITE_AT_LEAST_ONE,
    ROW_ID,
    Options,
    budget_options,
    cli,
    echo_json,
    json_option,
    make_budget,
    pass_options,
    progress_reporter,
)
from fastclass.ingest import MAX_PIXELS


@cli.command()
@click.option("--label", metavar="NAME", help="Only images of this label.")
@click.option("--min-size", default="32x32", show_default=True, metavar="WxH", help="Reject images smaller than this.")
@click.option("--max-pixels", type=click.IntRange(1), default=MAX_PIXELS, show_default=True,
              help="Reject images with more pixels (decompression bombs).")
@click.option("--max-aspect", type=FINITE_AT_LEAST_ONE, default=10.0, show_default=True,
              help="Reject images whose long side is more than this many times the short side.")
@click.option("--animated", type=click.Choice(["reject", "first-frame"]), default="reject", show_default=True,
              help="Reject animations, or keep them (training uses the first frame).")
@click.option("--recheck", is_flag=True, help="Check ok and rejected images again too (after changing the rules).")
@click.option("--prune", is_flag=True, help="Then remove the files of rejected images (rows stay, status deleted).")
@click.option("--workers", type=click.IntRange(1, 256), help="Worker processes [default: all cores].")
@click.option("--queue", "enqueue", is_flag=True,
              help="Only queue the images in chunks, for `fastclass worker`s to verify (PostgreSQL catalogs).")
@click.option("--chunk", type=click.IntRange(1), default=500, show_default=True,
              help="With --queue: images per queued job.")
@budget_options
@json_option("result")
@pass_options
def verify(opts: Options, label: str | None, min_size: str, max_pixels: int, max_aspect: float, animated: str,
           recheck: bool, prune: bool, workers: int | None, enqueue: bool, chunk: int, file_timeout: float,
           file_memory: int, as_json: bool) -> None:
    """Fully decode unverified images; mark each ok or rejected with its reason."""
    from dataclasses import asdict

    from fastclass.curate.verify import VerifyRules, parse_size, prune_rejected, verify_images

    width, height = parse_size(min_size)
    rules = VerifyRules(width, height, max_pixels, max_aspect, animated)
    if enqueue:
        if prune:
            raise click.UsageError("--prune runs after verify has finished: run `verify --prune` once the workers "
                                   "are done")
        from fastclass.queue import VERIFY_TASK
        from fastclass.queue.tasks import enqueue_chunks, pending_verify_ids

        with opts.session() as (catalog, session):
            ids = pending_verify_ids(session, recheck, label)
            chunks = enqueue_chunks(catalog, session, VERIFY_TASK, ids, chunk, rules=asdict(rules), recheck=recheck,
                                    file_timeout=file_timeout, file_memory=file_memory)
        _echo_queued(chunks, len(ids), "verify", as_json)
        return
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


def _echo_queued(chunks: list[tuple[int, int]], images: int, what: str, as_json: bool) -> None:
    if as_json:
        echo_json({"queued_jobs": len(chunks), "images": images, "chunks": chunks})
    else:
        click.echo(f"Queued {len(chunks)} {what} job(s) for {images} image(s); `fastclass worker` runs them.")


@cli.command()
@click.option("--threshold", type=click.IntRange(0, 32), default=10, show_default=True,
              help="Largest Hamming distance (of 64 bits) between near-duplicates.")
@click.option("--hash", "hash_kind", type=click.Choice(["phash", "dhash"]), default="phash", show_default=True)
@click.option("--flip", is_flag=True, help="Also match left-right mirrored copies.")
@click.option("--label", metavar="NAME", help="Only images of this label (conflicts cannot be seen then).")
@click.option("--dry-run", is_flag=True, help="Report the groups without changing the catalog.")
@click.option("--conflicts", "show_conflicts", is_flag=True,
              help="List the open label conflicts (claims and near-copies under two labels) and exit.")
@click.option("--embeddings", is_flag=True,
              help="Also group the near-copies an audit found in the embeddings (the latest, or --audit ID).")
@click.option("--audit", "audit_id", type=ROW_ID, metavar="ID", help="With --embeddings: this audit's near-copies.")
@json_option("result")
@pass_options
def dedup(opts: Options, threshold: int, hash_kind: str, flip: bool, label: str | None, dry_run: bool,
          show_conflicts: bool, embeddings: bool, audit_id: int | None, as_json: bool) -> None:
    """Group near-duplicate images; mark all but one keeper per group duplicate; find label conflicts."""
    from fastclass.curate.dedup import find_near_duplicates, list_conflicts

    with opts.session() as (_, session):
        if show_conflicts:
            conflicts = list_conflicts(session)
        else:
            if audit_id is not None and not embeddings:
                raise click.UsageError("--audit chooses the audit whose near-copies --embeddings groups; add "
                                       "--embeddings")
            result = find_near_duplicates(session, threshold, hash_kind, flip, label, dry_run,
                                          (audit_id or 0) if embeddings else None)
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
    if result.embedding_pairs is not None:
        click.echo(f"  {result.embedding_pairs} near-copy pair(s) from the audit's embeddings joined the groups.")
    if result.decided:
        click.echo(f"  {result.decided} group(s) hold reviewed images, left as the reviewer decided.")
    for lab, count in sorted(result.duplicates_per_label.items()):
        click.echo(f"  {lab}: {count} duplicate(s)")


@cli.command()
@click.option("--label", metavar="NAME", help="Only images of this label.")
@click.option("--status", type=click.Choice(["ok", "pending", "duplicate", "conflict", "rejected", "deleted"]),
              default="ok", show_default=True, help="Which images: by status, or the members of label conflicts.")
@click.option("--order", type=click.Choice(["label", "random", "newest", "loss", "issues"]), default="label",
              show_default=True, help="Review order (loss: highest training loss first, needs --run; issues: an "
              "audit's label issues, then its outliers).")
@click.option("--run", metavar="RUN", help="A training run whose predictions and losses to show.")
@click.option("--audit", "audit_id", type=ROW_ID, metavar="ID",
              help="The audit whose flags to show and order by [default with --order issues: the latest].")
@click.option("--apply", "apply_file", type=click.Path(path_type=Path), metavar="FILE.csv",
              help="No prompt: apply the decisions in FILE.csv (image,action,label).")
@click.option("--create-labels", is_flag=True, help="With --apply: relabel rows may name labels that do not exist yet.")
@click.option("--json", "as_json", is_flag=True, help="With --apply: print the result as JSON.")
@pass_options
def clean(opts: Options, label: str | None, status: str, order: str, run: str | None, audit_id: int | None,
          apply_file: Path | None, create_labels: bool, as_json: bool) -> None:
    """Review images one key at a time: keep, delete, relabel; every decision is saved at once."""
    from fastclass.curate.review import apply_csv, audit_with_scores, review_queue, reviewer_name, run_with_losses

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
    from fastclass.labels import relabel_digits
    from fastclass.stats import list_labels

    with opts.session() as (catalog, session):
        queue = review_queue(session, label, status, order, run, audit_id)
        if audit_id is not None or order == "issues":
            audit_id = audit_with_scores(session, audit_id)
        if not queue:
            click.echo(f"No images with status {status}" + (f" in label {label}" if label else "") + " to review.")
            return
        labels = [row["name"] for row in list_labels(session)]
        with terminal_keys() as read_key:
            stats = CleanPrompt(session, catalog.store, queue, labels, reviewer_name(), read_key,
                                run_id=run_with_losses(session, run) if run else None,
                                digits=relabel_digits(session), audit_id=audit_id).run()
    counts = stats.counts
    click.echo(f"Saved: {counts['keep']} kept, {counts['delete']} deleted, {counts['relabel']} relabelled, "
               f"{counts['undo']} undone this session.")


@cli.command()
@click.option("--image", "image_ref", metavar="ID|SHA", help="Only the reviews of this image.")
@click.option("--limit", type=COUNT, default=50, show_default=True)
@json_option("reviews")
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
    from fastclass.curate.review import decide_many
    from fastclass.labels import did_you_mean, label_exists, normalize_label, unknown_label

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
    from fastclass.curate.review import reviewer_name
    from fastclass.labels import rename_label

    with opts.session() as (_, session):
        change = rename_label(session, old, new, reviewer_name())
    click.echo(f"Renamed label {change.old} to {change.new} ({change.images} image(s)).")


@label.command("merge")
@click.argument("source")
@click.argument("target")
@pass_options
def label_merge(opts: Options, source: str, target: str) -> None:
    """Move every image and claim of SOURCE to TARGET and retire SOURCE."""
    from fastclass.curate.review import reviewer_name
    from fastclass.labels import merge_labels

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
    from fastclass.curate.review import reviewer_name
    from fastclass.labels import delete_label

    with opts.session() as (_, session):
        change = delete_label(session, name, reviewer_name(), force)
    click.echo(f"Deleted label {change.old}: {change.deleted_images} image(s) marked deleted, "
               f"{change.sources} claim(s) by other images dropped.")


@label.command("history")
@click.option("--limit", type=COUNT, default=50, show_default=True)
@json_option("history")
@pass_options
def label_history_(opts: Options, limit: int, as_json: bool) -> None:
    """Renames, merges and deletions of labels, newest first."""
    from fastclass.labels import label_history

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
@json_option("result")
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
