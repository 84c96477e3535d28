"""Helpers the tests share: real image bytes, the CLI in-process, catalog queries, small labelled sets."""
from __future__ import annotations

import contextlib
import io
import os
import random
from pathlib import Path

from click.testing import CliRunner
from PIL import Image

from fastclass.catalog import init_catalog, open_catalog
from fastclass.cli import cli

PG_ENV = "FASTCLASS_TEST_POSTGRES"
PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

def image_bytes(fmt: str = "JPEG", size: tuple[int, int] = (96, 72), seed: int = 0, mode: str = "RGB", **save) -> bytes:
    """A real, distinct image: smooth colour blocks plus noise, so perceptual hashes differ by seed."""
    rng = random.Random(seed)
    img = Image.new(mode, size)
    w, h = size
    block = max(w, h) // 4 or 1
    for x0 in range(0, w, block):
        for y0 in range(0, h, block):
            colour = tuple(rng.randrange(256) for _ in range(len(mode))) if len(mode) > 1 else rng.randrange(256)
            img.paste(colour, (x0, y0, x0 + block, y0 + block))
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def run_cli(args: list[str], catalog: str | None = None):
    prefix = ["--catalog", catalog] if catalog else []
    return CliRunner().invoke(cli, prefix + args, catch_exceptions=False)


def pg_server_url() -> str | None:
    """The PostgreSQL server for catalog tests, or None when none is reachable."""
    url = os.environ.get(PG_ENV, PG_DEFAULT)
    try:
        import psycopg
    except ImportError:
        return None
    try:
        psycopg.connect(libpq_url(url), connect_timeout=3).close()
    except psycopg.Error:
        return None
    return url


def libpq_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def catalog_rows(location: str, sql: str) -> list[tuple]:
    """Rows of a query on a catalog of either backend (a SQLite path or a database URL)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(location if "://" in location else f"sqlite:///{location}")
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(sql))]
    finally:
        engine.dispose()


def add_images(catalog, root: Path, spec: dict[str, list[bytes]]) -> None:
    """Import real files (root/<label>/<n>.<ext>) into the catalog and verify them, through the services."""
    from fastclass.curate.verify import verify_images
    from fastclass.ingest.importer import import_folder

    for label, blobs in spec.items():
        for n, data in enumerate(blobs):
            ext = "png" if data[:4] == b"\x89PNG" else "jpg"
            write(root / label / f"{n:04d}.{ext}", data)
    with catalog.session() as session:
        import_folder(session, catalog.store, root, workers=1)
        verify_images(session, catalog.store, workers=1)


def pngs(seeds, size: tuple[int, int] = (40, 40)) -> list[bytes]:
    return [image_bytes("PNG", size, seed=s) for s in seeds]


def photo_like(seed: int, size: tuple[int, int] = (64, 64), fmt: str = "PNG") -> bytes:
    """Smooth random structure (16x16 noise scaled up): distinct seeds are far apart in perceptual hash,
    while one seed at two sizes is a near-copy."""
    rng = random.Random(seed)
    small = Image.frombytes("RGB", (16, 16), bytes(rng.randrange(256) for _ in range(16 * 16 * 3)))
    buf = io.BytesIO()
    small.resize(size, Image.BILINEAR).save(buf, fmt)
    return buf.getvalue()


@contextlib.contextmanager
def sqlite_catalog_named(tmp_path: Path, name: str):
    """Another initialised SQLite catalog (with its own store) beside the test's, open for the block."""
    location = str(tmp_path / f"{name}.db")
    init_catalog(location, str(tmp_path / f"{name}-store"))
    catalog = open_catalog(location)
    try:
        yield catalog
    finally:
        catalog.close()


def digit_images(digits: dict[str, int], per_class: int, size: int = 64, skip: int = 0) -> dict[str, list[bytes]]:
    """Real handwritten digits (scikit-learn's 8x8 set) scaled up to size x size RGB PNGs: label -> images.
    `skip` leaves out the first images of each digit, for held-out examples."""
    from sklearn.datasets import load_digits

    digits_set = load_digits()
    wanted = {digit: label for label, digit in digits.items()}
    found: dict[str, list[bytes]] = {label: [] for label in digits}
    seen: dict[int, int] = {}
    for pixels, target in zip(digits_set.images, digits_set.target):
        label = wanted.get(int(target))
        if label is None or len(found[label]) >= per_class:
            continue
        seen[target] = seen.get(target, 0) + 1
        if seen[target] <= skip:
            continue
        small = Image.fromarray((pixels * 255 / 16).astype("uint8"))
        buf = io.BytesIO()
        small.resize((size, size), Image.BILINEAR).convert("RGB").save(buf, "PNG")
        if buf.getvalue() not in found[label]:
            found[label].append(buf.getvalue())
    return found


def snapshot_of(catalog, root: Path, spec: dict[str, list[bytes]], name: str, valid_pct: float = 0.2) -> None:
    """Import, verify, split and snapshot real images through the services."""
    from fastclass.dataset.snapshot import create_snapshot
    from fastclass.dataset.split import assign_splits

    add_images(catalog, root, spec)
    with catalog.session() as session:
        assign_splits(session, valid_pct, 42, 1)
        create_snapshot(session, name)
