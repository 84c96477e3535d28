"""The `fastclass` command line: parse options, call one service, print its result."""
from __future__ import annotations

import contextlib
import importlib
import json
import logging
import sys
import traceback
import warnings
from dataclasses import dataclass
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


def json_option(what: str) -> Callable:
    """The --json flag every listing command has: `@json_option("jobs")` prints the jobs as JSON."""
    return click.option("--json", "as_json", is_flag=True, help=f"Print the {what} as JSON.")


def echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


# Each stage's commands register themselves on `cli` when their module is imported.
for _stage in ("catalog", "ingest", "crawl", "curate", "dataset", "train", "audit", "serve"):
    importlib.import_module(f"fastclass.cli.{_stage}")


def main() -> None:
    cli(prog_name="fastclass")


if __name__ == "__main__":
    main()
