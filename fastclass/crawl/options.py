"""What one class's crawl is asked to do: its options (stored with its job), and the fastclass CSV of classes."""
from __future__ import annotations

import json
import re
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastclass.errors import FastclassError
from fastclass.ingest import MAX_BYTES as DEFAULT_MAX_BYTES
from fastclass.labels import normalize_label
from fastclass.text import csv_records, printable


@dataclass
class CrawlOptions:
    """Everything one class's crawl needs; stored with its job so `--resume` can run it again."""

    query: str
    label: str
    engines: list[str]
    max_new: int = 100
    min_size: tuple[int, int] | None = None
    threads: int = 8
    per_host: int = 4
    filters: dict[str, str] = field(default_factory=dict)
    pages: list[str] = field(default_factory=list)
    urls_file: str | None = None
    engine_urls: dict[str, str] = field(default_factory=dict)
    max_bytes: int = DEFAULT_MAX_BYTES
    timeout: float = 10.0
    connect_timeout: float = 5.0
    max_redirects: int = 5
    retries: int = 3
    max_failures: int = 30
    license: str = "any"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CrawlOptions":
        data = json.loads(text)
        data = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if data.get("min_size"):
            data["min_size"] = tuple(data["min_size"])
        return cls(**data)


def label_from_query(query: str, exclude: list[str] = ()) -> str:
    """A label from a search term: the exclude words removed, lower case, spaces to underscores."""
    words = [w for w in re.split(r"\s+", query.strip()) if w and w.lower() not in {e.lower() for e in exclude}]
    label = "_".join(words).lower()
    label = re.sub(r"[^\w&+.-]+", "_", label).strip("_.")
    return normalize_label(label or "unnamed")


def parse_filters(pairs: list[str]) -> dict[str, str]:
    filters = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise FastclassError(f"--filter {pair!r} is not KEY=VALUE, e.g. type=photo")
        filters[key.strip()] = value.strip()
    return filters


def parse_engine_urls(pairs: list[str]) -> dict[str, str]:
    urls = {}
    for pair in pairs:
        name, sep, base = pair.partition("=")
        from fastclass.crawl.engines import get_engine
        from fastclass.crawl.fetch import http_url

        if not sep or not http_url(base):
            raise FastclassError(f"--engine-url {pair!r} is not ENGINE=http(s)://HOST[:PORT]")
        get_engine(name)
        urls[name] = base
    return urls


@dataclass
class ClassRow:
    line: int
    query: str
    label: str


def read_class_csv(path: Path) -> tuple[list[ClassRow], list[str]]:
    """Rows of the fastclass CSV (`searchterm,exclude`, optional `label`), and one message per bad row.

    The query sent to the engines is the search term plus `-word` for each exclude word; the label is the
    search term without the exclude words. Exclude words are separated by spaces; quote phrases. Each line
    is one row, parsed strictly: a quote left open is that line's error, never a swallowed rest of file.
    """
    rows, errors = [], []
    header: list[str] = []
    column: dict[str, int] = {}
    for line, record, problem in csv_records(path, "CSV file"):
        where = f"{path}:{line}"
        if problem is not None:
            if not header:
                raise FastclassError(f"{where}: {problem}")
            errors.append(f"{where}: {problem}")
            continue
        if not header:
            header = [h.strip().lower() for h in record]
            if "searchterm" not in header:
                raise FastclassError(f"{where}: the first line must be the header `searchterm,exclude` "
                                     f"(found {printable(','.join(record)[:80])!r})")
            column = {name: header.index(name) for name in ("searchterm", "exclude", "label") if name in header}
            continue
        row = _class_row(record, header, column, where, line)
        if isinstance(row, str):
            errors.append(row)
        else:
            rows.append(row)
    if not header:
        raise FastclassError(f"{path}: the file is empty; its first line must be the header `searchterm,exclude`")
    return rows, errors


def _class_row(record: list[str], header: list[str], column: dict[str, int], where: str,
               line: int) -> ClassRow | str:
    """One CSV record as a class, or the message saying what is wrong with it."""
    def cell(name: str) -> str:
        index = column.get(name)
        return record[index].strip() if index is not None and index < len(record) else ""

    term = cell("searchterm")
    if not term:
        return f"{where}: empty searchterm"
    if any(extra.strip() for extra in record[len(header):]):
        return (f"{where}: {len(record)} fields, the header has {len(header)} "
                "(quote a search term that holds a comma)")
    try:
        exclude = shlex.split(cell("exclude"))
    except ValueError as exc:
        return f"{where}: exclude column: {exc}"
    try:
        label = normalize_label(cell("label")) if cell("label") else label_from_query(term, exclude)
    except FastclassError as exc:
        return f"{where}: {exc}"
    query = " ".join([term] + [f'-"{w}"' if " " in w else f"-{w}" for w in exclude])
    return ClassRow(line, query, label)
