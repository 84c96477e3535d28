"""Crawling: `crawl`, `jobs` and `worker`."""
from __future__ import annotations

from pathlib import Path

import click

from fastclass.cli import COUNT, ROW_ID, Options, cli, echo_json, json_option, pass_options, progress_reporter
from fastclass.crawl import CANARY_QUERY, LICENSES


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
              help="bing, ddg, baidu, google, flickr, greedy or urls (repeatable) [default: bing, ddg, baidu; "
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
              help="Only queue the job(s), for `fastclass worker`s on any machine to run (PostgreSQL catalogs).")
@click.option("--allow-private", is_flag=True,
              help="Also fetch from loopback, private and link-local addresses (intranets, local test servers).")
@click.option("--license", "license_", type=click.Choice(LICENSES), default="any", show_default=True,
              help="Only images whose licence allows this reuse, through each engine's own filter (recorded "
                   "with each source); engines without a licence filter are refused.")
@json_option("job record(s)")
@pass_options
def crawl(opts: Options, query: str | None, label: str | None, engines: tuple[str, ...], max_new: int,
          min_size: str | None, threads: int, per_host: int, filters: tuple[str, ...], pages: tuple[str, ...],
          urls_file: Path | None, engine_urls: tuple[str, ...], from_csv: Path | None, resume: bool, timeout: float,
          max_bytes: str, retries: int, max_failures: int, enqueue: bool, allow_private: bool, license_: str,
          as_json: bool) -> None:
    """Crawl web images for one class (QUERY), every class of a CSV (--from), or unfinished crawls (--resume).
    Exits 1 when no engine could deliver for a class."""
    from fastclass.crawl.crawler import run_crawl
    from fastclass.crawl.engines import DEFAULT_ENGINES
    from fastclass.crawl.jobs import plan_crawls
    from fastclass.crawl.options import CrawlOptions, parse_engine_urls, parse_filters
    from fastclass.curate.verify import parse_size
    from fastclass.text import printable

    if sum(bool(x) for x in (query, from_csv, resume)) > 1:
        raise click.UsageError("give one of QUERY, --from FILE.csv or --resume")
    if enqueue and resume:
        raise click.UsageError("--queue and --resume cannot be used together (the queue retries its jobs itself)")
    if enqueue and allow_private:
        raise click.UsageError("--allow-private is the worker's choice: pass it to `fastclass worker`, not --queue")
    engine_list = list(engines) or (["greedy"] if pages else ["urls"] if urls_file else list(DEFAULT_ENGINES))
    if not (query or from_csv or resume or pages or urls_file):
        raise click.UsageError("give a QUERY, --from FILE.csv, --resume, --url PAGE or --urls FILE")

    if not (query or label or from_csv or resume):
        raise click.UsageError("--label is needed when there is no QUERY")
    template = CrawlOptions(
        query="", label="", engines=engine_list, max_new=max_new,
        min_size=parse_size(min_size) if min_size else None, threads=threads, per_host=per_host,
        filters=parse_filters(list(filters)), pages=list(pages),
        urls_file=str(urls_file.resolve()) if urls_file else None,
        engine_urls=parse_engine_urls(list(engine_urls)), max_bytes=_parse_bytes(max_bytes), timeout=timeout,
        retries=retries, max_failures=max_failures, license=license_)
    reports = []
    with opts.session() as (catalog, session):
        plan = plan_crawls(session, template, query, label, from_csv, resume)
        bad_rows, planned = plan.bad_rows, plan.runs
        if not enqueue:
            from fastclass.crawl.health import broken_warnings

            for warning in broken_warnings(session, [e for _, o in planned for e in o.engines]):
                click.echo(printable(f"Warning: {warning}"), err=True)
        for message in bad_rows:
            click.echo(f"Warning: {message}", err=True)
        if resume and not planned:
            click.echo("Nothing to resume: every crawl finished.", err=True)
        log_dir = catalog.work_dir / "logs"
        if enqueue:
            from fastclass.queue.tasks import enqueue_crawls

            runs = [options for _, options in planned]
            queued = list(zip(enqueue_crawls(catalog, session, runs), runs)) if runs else []
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
            for problem in reports[-1].problems:
                click.echo(printable(f"Warning: {problem}"), err=True)
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
    empty = [r.label for r in reports if r.status == "failed"]
    if empty:
        raise click.ClickException(f"no engine could deliver for {', '.join(empty)} (the problems are listed "
                                   "above)")


def _echo_yield(engines: dict) -> None:
    """The per-engine yield table of a crawl (EngineStats, or their dicts from a job record)."""
    click.echo(f"  {'engine':8s} {'found':>6s} {'unique':>6s} {'known':>6s} {'fetched':>7s} {'images':>6s} "
               f"{'new':>5s} {'dupes':>5s} {'near':>4s} {'failed':>6s} {'secs':>6s}  ended")
    for name, stats in engines.items():
        s = stats if isinstance(stats, dict) else stats.__dict__
        click.echo(f"  {name:8s} {s.get('found', 0):6d} {s.get('unique', 0):6d} {s.get('skipped', 0):6d} "
                   f"{s.get('downloaded', 0):7d} {s.get('decoded', 0):6d} {s.get('new', 0):5d} "
                   f"{s.get('duplicates', 0):5d} {s.get('failed', 0):6d} {s.get('seconds', 0.0):6.1f}  "
                   f"{s.get('ended') or ''}")


def _echo_crawl(report, max_new: int) -> None:
    from fastclass.text import printable

    query = f" ({report.query!r})" if report.query else ""
    click.echo(f"Crawl job {report.job_id} {report.status}: {report.label}{query}: "
               f"{report.new_images} new of --max {max_new}, {report.exact_duplicates} already known, "
               f"{report.near_duplicates} near-copies of known images, {sum(report.rejected.values())} rejected, {sum(report.failed.values())} failed, "
               f"{report.skipped} skipped as fetched before; {report.seconds:.1f} s")
    if report.conflicts:
        click.echo(f"  {report.conflicts} image(s) were already in the catalog under another label: recorded as "
                   "label conflicts (`fastclass clean --status conflict`)")
    _echo_yield(report.engines)
    if report.short_of_max():
        click.echo(printable(f"  short of --max: {report.short_of_max()}"))
    for reason, count in (report.rejected + report.failed).most_common():
        click.echo(printable(f"  {count:6d}  {reason}"))


@cli.group(invoke_without_command=True)
@click.option("--limit", type=COUNT, help="Only the newest N jobs.")
@json_option("jobs")
@click.pass_context
def jobs(ctx: click.Context, limit: int | None, as_json: bool) -> None:
    """Crawl jobs, newest first: query, label, status and counts (`jobs show ID`: one job's yield)."""
    if ctx.invoked_subcommand is not None:
        return
    from fastclass.crawl.jobs import list_jobs
    from fastclass.queue import other_work
    from fastclass.text import printable

    opts = ctx.find_object(Options)
    with opts.session() as (_, session):
        rows = list_jobs(session, limit)
        other = other_work(session)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("No crawl jobs yet.")
    for row in rows:
        click.echo(printable(_job_line(row)))
        if row["last_error"] and row["status"] != "done":
            click.echo("      last error: " + printable(row["last_error"]))
    if other:
        click.echo("Other queued work: " + "; ".join(f"{w['task']} {w['status']} {w['jobs']}" for w in other)
                   + " (`fastclass jobs queue` lists each job)")


def _job_line(row: dict) -> str:
    line = (f"{row['id']:5d} {row['status']:11s} {str(row['label'])[:24]:24s} new {row['new']:5d}/"
            f"{row['max'] or '?'}  found {row['found']:5d}  dupes {row['exact_duplicates']:4d}  "
            f"rejected {row['rejected']:4d}  [{row['engines']}] {row['started_at']:%Y-%m-%d %H:%M}")
    if row["worker"]:
        line += f"  worker {row['worker']} (run {row['runs']})"
    if row["next_try"] is not None and row["runs"]:
        line += f"  next try {row['next_try']:%H:%M:%S}"
    return line


@jobs.command("show")
@click.argument("job_id", type=ROW_ID, metavar="ID")
@json_option("job")
@pass_options
def jobs_show(opts: Options, job_id: int, as_json: bool) -> None:
    """One crawl job: its options, outcome, and per engine the yield from results seen to new images."""
    from fastclass.crawl.jobs import list_jobs
    from fastclass.text import printable

    with opts.session() as (_, session):
        rows = [row for row in list_jobs(session) if row["id"] == job_id]
    if not rows:
        raise click.ClickException(f"no crawl job {job_id} (see `fastclass jobs`)")
    row = rows[0]
    if as_json:
        echo_json(row)
        return
    click.echo(printable(f"Crawl job {row['id']} {row['status']}: {row['label']} ({row['query']!r}), "
                         f"new {row['new']} of --max {row['max'] or '?'}, found {row['found']}, "
                         f"{row['exact_duplicates']} already known, {row['near_duplicates']} near-copies, "
                         f"{row['rejected']} rejected; "
                         f"{(row['seconds'] or 0):.1f} s"))
    _echo_yield(row["engine_stats"])
    for reason, count in sorted(row["reasons"].items(), key=lambda item: -item[1]):
        click.echo(printable(f"  {count:6d}  {reason}"))
    if row["last_error"]:
        click.echo(printable(f"  last problem: {row['last_error']}"))


@jobs.command("queue")
@click.option("--limit", type=COUNT, help="Only the newest N jobs.")
@click.option("--status", type=click.Choice(["queued", "running", "retrying", "stalled", "done", "failed",
                                             "cancelled", "aborted"]), help="Only jobs in this state.")
@json_option("queued jobs")
@pass_options
def jobs_queue(opts: Options, limit: int | None, status: str | None, as_json: bool) -> None:
    """Every queued job (crawls, verify and embed chunks, engine checks), newest first: its state, runs,
    what it covers and the last error of a failed one (PostgreSQL catalogs)."""
    from fastclass.queue import list_queue, needs_postgres
    from fastclass.text import printable

    with opts.session() as (catalog, session):
        needs_postgres(catalog)
        rows = list_queue(session, limit, status)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("No queued jobs" + (f" {status}." if status else "."))
    for row in rows:
        when = f"  next try {row['next_try']:%H:%M:%S}" if row["next_try"] and row["runs"] else ""
        click.echo(f"{row['id']:6d} {row['task']:14s} {row['status']:9s} runs {row['runs']}  "
                   + printable(row["covers"]) + when)
        if row["last_error"]:
            click.echo(f"       last error (on {printable(row['failed_on'])}): {printable(row['last_error'])}")


@jobs.command("cancel")
@click.argument("job_id", type=ROW_ID, metavar="ID")
@pass_options
def jobs_cancel(opts: Options, job_id: int) -> None:
    """Cancel a queued crawl job; a running one is stopped by its worker (its work so far kept, no retry)."""
    from fastclass.queue.tasks import cancel_crawl

    with opts.session() as (catalog, session):
        outcome = cancel_crawl(catalog, session, job_id)
    click.echo(f"Cancelled crawl job {job_id}." if outcome == "cancelled" else
               f"Asked the worker running crawl job {job_id} to stop it; it ends aborted, its work so far kept.")


@cli.command()
@click.option("--concurrency", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Jobs run at once by this worker.")
@click.option("--queues", "queues", multiple=True, metavar="NAME[,NAME]",
              help="Only these queues: crawl, verify, embed, engines (repeatable) [default: all].")
@click.option("--name", metavar="NAME", help="This worker's name in `fastclass jobs` [default: host:pid].")
@click.option("--until-empty", is_flag=True,
              help="Stop when no job of these queues is queued, waiting for a retry or running anywhere.")
@click.option("--allow-private", is_flag=True,
              help="Let this worker's jobs fetch from loopback, private and link-local addresses.")
@click.option("--stalled-after", type=click.FloatRange(3), default=30.0, show_default=True,
              help="Seconds without a heartbeat (every worker sends one a second) after which a worker counts as "
                   "dead and its jobs are queued again.")
@click.option("--retries", type=click.IntRange(0, 100), default=3, show_default=True,
              help="Times a failing job runs again before it is failed.")
@click.option("--retry-wait", type=click.FloatRange(0), default=30.0, show_default=True,
              help="Seconds before the first retry of a failed job; each further retry waits twice as long.")
@click.option("--check-engines", metavar="CRON",
              help="Also run the engines' canary check on this schedule, e.g. '0 * * * *' (hourly); every worker "
                   "may give it, it runs once per time.")
@click.option("--check-only", "check_only", multiple=True, metavar="ENGINE",
              help="With --check-engines: check only this engine (repeatable) [default: every checkable one].")
@click.option("--engine-url", "engine_urls", multiple=True, metavar="ENGINE=BASE_URL",
              help="With --check-engines: send an engine's canary requests to a mirror or proxy (repeatable).")
@click.option("--poll", type=click.FloatRange(0.1), default=2.0, show_default=True,
              help="Seconds between looks at the queue when no notification came.")
@click.option("--json", "as_json", is_flag=True, help="At the end, print the jobs this worker ran as JSON.")
@pass_options
def worker(opts: Options, concurrency: int, queues: tuple[str, ...], name: str | None, until_empty: bool,
           allow_private: bool, stalled_after: float, retries: int, retry_wait: float, check_engines: str | None,
           check_only: tuple[str, ...], engine_urls: tuple[str, ...], poll: float, as_json: bool) -> None:
    """Run queued jobs (`crawl --queue`, `verify --queue`, `embed --queue`, `engines check --queue`) from a
    PostgreSQL catalog; start any number, on any machine. Ctrl-C puts a running job back in the queue."""
    from fastclass.crawl.options import parse_engine_urls
    from fastclass.queue.worker import WorkerOptions, run_worker
    from fastclass.text import printable

    if (engine_urls or check_only) and not check_engines:
        raise click.UsageError("--check-only and --engine-url are for the periodic engines check: give "
                               "--check-engines CRON too")
    from fastclass.crawl.engines import get_engine

    for engine in check_only:
        get_engine(engine)
    chosen = [q.strip() for value in queues for q in value.split(",") if q.strip()] or None
    options = WorkerOptions(name=name, queues=chosen, concurrency=concurrency, until_empty=until_empty,
                            allow_private=allow_private, stalled_after=stalled_after, retries=retries,
                            retry_wait=retry_wait, check_engines=check_engines, check_only=list(check_only),
                            engine_urls=parse_engine_urls(list(engine_urls)), poll=poll)

    def on_job(line: str) -> None:
        if not as_json:
            click.echo(printable(line))

    catalog = opts.open()
    try:
        result = run_worker(catalog, options, on_job)
    finally:
        catalog.close()
    if as_json:
        echo_json(result.as_dict())
    elif result.stopped_by_signal:
        click.echo(f"Stopped; {len(result.lines)} job(s) run, a running one was put back in the queue.", err=True)


@cli.group(invoke_without_command=True)
@json_option("engines")
@click.pass_context
def engines(ctx: click.Context, as_json: bool) -> None:
    """Crawl engines: what each searches, what it needs, its latest health (`engines check` runs canaries)."""
    if ctx.invoked_subcommand is not None:
        return
    from fastclass.crawl.health import list_engines

    with ctx.find_object(Options).session() as (_, session):
        rows = list_engines(session)
    if as_json:
        echo_json(rows)
        return
    for row in rows:
        health = row["health"]
        shown = f"{health['verdict']} ({health['checked_at'][:16]})" if health else "never checked"
        needs = f", needs {row['needs']}" if row["needs"] else ""
        click.echo(f"{row['name']:7s} {'default' if row['default'] else '':7s} {shown:28s} {row['summary']}{needs}")


@engines.command("check")
@click.argument("names", nargs=-1, metavar="[ENGINE]...")
@click.option("--query", default=CANARY_QUERY, show_default=True, help="The canary query.")
@click.option("--engine-url", "engine_urls", multiple=True, metavar="ENGINE=BASE_URL",
              help="Send an engine's requests to a mirror, proxy or test server (repeatable).")
@click.option("--timeout", type=click.FloatRange(0.1), default=10.0, show_default=True,
              help="Seconds to wait for a server to answer or send more data.")
@click.option("--allow-private", is_flag=True,
              help="Also fetch from loopback, private and link-local addresses.")
@click.option("--queue", "enqueue", is_flag=True,
              help="Only queue the check, for a `fastclass worker` to run (PostgreSQL catalogs; workers run it "
                   "on a schedule with --check-engines CRON).")
@json_option("results")
@pass_options
def engines_check(opts: Options, names: tuple[str, ...], query: str, engine_urls: tuple[str, ...], timeout: float,
                  allow_private: bool, enqueue: bool, as_json: bool) -> None:
    """Run one small canary query per engine [default: every engine that needs no --url or --urls]: results
    on pages 1 and 2, a sample of 10 downloaded and decoded; verdict ok, degraded or broken, recorded."""
    from fastclass.crawl.health import check_engines, checkable_engines
    from fastclass.crawl.options import CrawlOptions, parse_engine_urls
    from fastclass.text import printable

    if enqueue:
        if allow_private:
            raise click.UsageError("--allow-private is the worker's choice: pass it to `fastclass worker`, not --queue")
        from fastclass.crawl.engines import get_engine
        from fastclass.queue.tasks import enqueue_engines_check

        for name in names:
            get_engine(name)
        with opts.session() as (catalog, session):
            job_id = enqueue_engines_check(catalog, session, engines=list(names) or None, query=query,
                                           engine_urls=parse_engine_urls(list(engine_urls)), timeout=timeout)
        if as_json:
            echo_json({"queued_job": job_id})
        else:
            click.echo(f"Queued the engines check as job {job_id}; `fastclass worker` runs it.")
        return
    chosen = list(names) or checkable_engines()
    options = CrawlOptions(query=query, label="canary", engines=chosen,
                           engine_urls=parse_engine_urls(list(engine_urls)), timeout=timeout)
    with opts.session() as (catalog, session):
        results = check_engines(session, chosen, options, catalog.work_dir / "logs", allow_private)
    if as_json:
        echo_json([r.as_dict() for r in results])
        return
    click.echo(f"{'engine':7s} {'verdict':9s} {'page 1':>6s} {'page 2':>6s} {'downloads':>10s} {'decodes':>8s}")
    for r in results:
        share = (lambda x: "-" if x is None else f"{x:.0%}")
        click.echo(f"{r.engine:7s} {r.verdict:9s} {r.page1:6d} {r.page2:6d} {share(r.download_share):>10s} "
                   f"{share(r.decode_share):>8s}")
        if r.problem:
            click.echo(printable(f"  {r.problem}" + (f" (page saved to {r.saved_page})" if r.saved_page else "")))
