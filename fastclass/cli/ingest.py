"""`import`: bring a folder of images in."""
from __future__ import annotations

from pathlib import Path

import click

from fastclass.cli import (
    Options,
    budget_options,
    cli,
    echo_json,
    json_option,
    make_budget,
    pass_options,
    progress_reporter,
)


@cli.command("import")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--label", metavar="NAME", help="One label for every file (a flat folder); else DIR/<label>/<files>.")
@click.option("--workers", type=click.IntRange(1, 256), help="Worker processes for hashing [default: all cores].")
@budget_options
@json_option("result")
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
