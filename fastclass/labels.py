"""Label names: validation of untrusted names and lookup/creation of label rows."""
from __future__ import annotations

import re
import unicodedata
from typing import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Label
from fastclass.errors import FastclassError, NotFoundError

MAX_LABEL_LENGTH = 100
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|]")


def normalize_label(name: str) -> str:
    """A label as stored: NFC, trimmed, no path separators or control characters (labels become folder names)."""
    cleaned = unicodedata.normalize("NFC", name).strip()
    if not cleaned:
        raise FastclassError("a label cannot be empty")
    if len(cleaned) > MAX_LABEL_LENGTH:
        raise FastclassError(f"label {cleaned[:20]!r}... is longer than {MAX_LABEL_LENGTH} characters")
    if _UNSAFE.search(cleaned) or cleaned in {".", ".."} or cleaned.startswith("."):
        raise FastclassError(
            f"label {cleaned!r} holds a character that cannot be part of a folder name "
            "(/ \\ : * ? \" < > | or a control character) or starts with a dot"
        )
    return cleaned


def label_ids(session: Session, names: Iterable[str]) -> dict[str, int]:
    """Ids of the given (already normalized) labels, creating the missing ones."""
    wanted = set(names)
    if not wanted:
        return {}
    found = dict(session.execute(select(Label.name, Label.id).where(Label.name.in_(wanted))).all())
    for name in sorted(wanted - found.keys()):
        label = Label(name=name)
        session.add(label)
        session.flush()
        found[name] = label.id
    return found


def existing_label_id(session: Session, name: str) -> int:
    """The id of a label that must exist (a --label filter); the error says where to look."""
    label_id = session.scalar(select(Label.id).where(Label.name == name))
    if label_id is None:
        raise NotFoundError(f"no label {name!r} in the catalog (see `fastclass labels`)")
    return label_id
