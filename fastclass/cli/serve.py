"""`fastclass serve`: the review gallery in a browser."""
from __future__ import annotations

import ipaddress
import secrets
import socket

import click

from fastclass.cli import Options, cli, pass_options


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback one (only this machine can connect)."""
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP))
    except (OSError, ValueError):
        return False


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; any but loopback needs the printed token on every request.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True)
@click.option("--open/--no-open", "open_browser", default=True, show_default=True,
              help="Open the gallery in the default browser.")
@click.option("--token", "force_token", is_flag=True,
              help="Require the printed token on loopback too (a machine other people log in to).")
@pass_options
def serve(opts: Options, host: str, port: int, open_browser: bool, force_token: bool) -> None:
    """A keyboard-first web gallery on the catalog: grids by label and status, the review queues, each
    image's story; keep, delete and relabel one image or a selection, committed at once, undoable."""
    import uvicorn

    from fastclass.catalog import open_catalog
    from fastclass.curate.review import reviewer_name
    from fastclass.web.app import create_app

    token = secrets.token_urlsafe(24) if force_token or not is_loopback(host) else None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    catalog = open_catalog(opts.location)
    try:
        server = uvicorn.Server(uvicorn.Config(create_app(catalog, reviewer_name(), token), log_level="warning",
                                               access_log=False))
        shown_host = f"[{host}]" if ":" in host else host
        url = f"http://{shown_host}:{sock.getsockname()[1]}/" + (f"?token={token}" if token else "")
        click.echo(f"Serving {catalog.display} at {url} (Ctrl-C stops)")
        if open_browser:
            click.launch(url)
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:
            # uvicorn stops on Ctrl-C, then raises it again; for a server that is the normal way to stop.
            pass
        click.echo("Stopped; every decision was committed when it was made.")
    finally:
        sock.close()
        catalog.close()
