"""Text from outside (the web, file names, CSV files): made safe to show, and read strictly."""
from __future__ import annotations

import codecs
import csv
from pathlib import Path
from typing import Iterator

from fastclass.errors import FastclassError, NotFoundError


def printable(text: str) -> str:
    """Text from the web or a file name, made safe for a terminal: control characters (escape sequences
    that retitle or recolour it), bidirectional overrides and other invisible characters shown as U+FFFD."""
    return "".join(c if c.isprintable() else "\ufffd" for c in text)


def parse_id(text: str) -> int | None:
    """A catalog id typed by a user ("42"), or None for text that is not one (too large for the catalog's
    64-bit integers included)."""
    text = text.strip()
    if not text.isascii() or not text.isdigit() or int(text) >= 2**63:
        return None
    return int(text)


MAX_TEXT_BYTES = 10 * 1024 * 1024


def read_text_file(path: Path, what: str) -> str:
    """A small text file's contents: UTF-8 (with or without a BOM) or UTF-16 with a BOM; anything else is
    refused with the line and byte that are not UTF-8, rather than guessed (a wrong guess makes wrong labels)."""
    if not path.is_file():
        raise NotFoundError(f"{what} {path} does not exist")
    if path.stat().st_size > MAX_TEXT_BYTES:
        raise FastclassError(f"{what} {path} is larger than {MAX_TEXT_BYTES // (1024 * 1024)} MB")
    data = path.read_bytes()
    for bom, encoding in ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"),
                          (codecs.BOM_UTF16_BE, "utf-16-be")):
        if data.startswith(bom):
            data, chosen = data[len(bom):], encoding
            break
    else:
        chosen = "utf-8"
        if b"\x00" in data[:4096]:
            raise FastclassError(f"{path}: looks like UTF-16 without a byte-order mark; save the file as UTF-8")
    try:
        return data.decode(chosen)
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise FastclassError(f"{path}:{line}: not {chosen.upper()} (byte 0x{data[exc.start]:02X}); save the file "
                             "as UTF-8") from None


MAX_CSV_LINE = 4000


def csv_records(path: Path, what: str) -> Iterator[tuple[int, list[str] | None, str | None]]:
    """(line number, record, None) for each non-blank line of a CSV file, or (line number, None, what is
    wrong) for a bad one. Each line is one record, parsed strictly: a quote left open is that line's
    error, never a swallowed rest of the file (fastclass's CSV cells never hold line breaks)."""
    for line, text in enumerate(read_text_file(path, what).splitlines(), start=1):
        if not text.strip():
            continue
        if len(text) > MAX_CSV_LINE:
            yield line, None, f"the line is longer than {MAX_CSV_LINE} characters"
            continue
        try:
            record = next(csv.reader([text], skipinitialspace=True, strict=True))
        except csv.Error as exc:
            yield line, None, "a quote is not closed" if "end of data" in str(exc) else str(exc)
            continue
        if any(not c.isprintable() for c in "".join(record)):
            yield line, None, "a control or invisible character in the row"
            continue
        yield line, record, None
