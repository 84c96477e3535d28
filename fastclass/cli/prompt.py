"""The interactive `fastclass clean` prompt (part of the command line layer: it reads keys and draws).

Every key that decides calls `fastclass.curate.review.decide`, which commits before the next key is read, so
quitting, Ctrl-C, a closed terminal or a kill lose at most the key in flight.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import termios
import time
import tty
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import click
from sqlalchemy.orm import Session

from fastclass.cli.preview import detect_protocol, load_for_preview, render
from fastclass.curate.review import Decision, decide, image_card, reviewed_ids, undo
from fastclass.errors import FastclassError
from fastclass.labels import did_you_mean, label_exists, relabel_digits
from fastclass.store import Store
from fastclass.text import printable

LEFT, RIGHT = ("\x1b[D", "\x1bOD"), ("\x1b[C", "\x1bOC")
ENTER, ESC, TAB, BACKSPACE = ("\r", "\n"), "\x1b", "\t", ("\x7f", "\x08")

HELP = """Keys
  k or space   keep (a duplicate or deleted image becomes ok again)
  d            delete (status deleted; the file stays until `fastclass prune`)
  r            relabel: type a label (Tab completes, Enter confirms, Esc cancels)
  1-9          relabel to the label with that number (shown at the bottom)
  a            accept the label an audit suggests (shown when it flagged the image)
  s            skip to the next image you have not reviewed
  b or Left    back to the previous image;  Right: next image
  u            undo the last decision of this session
  o            open the image in the system viewer
  ?            this help;  q: quit (everything decided is already saved)
"""


class KeyReader:
    """Single keys from a terminal in cbreak mode (Ctrl-C still interrupts). Bytes that arrive together
    (fast typing, key repeat, a paste) are split into keys, so no key is lost or merged."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pending: deque[str] = deque()

    def __call__(self) -> str:
        while not self.pending:
            data = os.read(self.fd, 64)
            if not data:
                raise EOFError("the terminal closed")
            self.pending.extend(_split_keys(data.decode("utf-8", "replace")))
        return self.pending.popleft()


def _split_keys(text: str) -> list[str]:
    keys, i = [], 0
    while i < len(text):
        if text[i] == ESC and i + 2 < len(text) and text[i + 1] in "[O":
            j = i + 2
            while j < len(text) and not text[j].isalpha() and text[j] != "~":
                j += 1
            keys.append(text[i:j + 1])
            i = j + 1
        else:
            keys.append(text[i])
            i += 1
    return keys


@contextlib.contextmanager
def terminal_keys() -> Iterator[KeyReader]:
    """Put the terminal into cbreak mode for the block (restored however the block ends)."""
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield KeyReader(fd)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@dataclass
class SessionStats:
    started: float = field(default_factory=time.monotonic)
    counts: dict = field(default_factory=lambda: {"keep": 0, "delete": 0, "relabel": 0, "undo": 0})

    def line(self, reviewed: int, total: int) -> str:
        minutes = max((time.monotonic() - self.started) / 60, 1 / 60)
        decided = self.counts["keep"] + self.counts["delete"] + self.counts["relabel"]
        return (f"reviewed {reviewed}/{total} ({total - reviewed} remaining) · this session: "
                f"{self.counts['keep']} kept, {self.counts['delete']} deleted, {self.counts['relabel']} relabelled"
                f" · {decided / minutes:.1f}/min")


class CleanPrompt:
    def __init__(self, session: Session, store: Store, queue: list[int], labels: list[str],
                 reviewer: str, read_key, protocol: str | None = None, run_id: int | None = None,
                 digits: dict[int, str] | None = None, audit_id: int | None = None) -> None:
        self.read_key = read_key
        self.run_id = run_id
        self.audit_id = audit_id
        self.suggested: str | None = None
        self.session = session
        self.store = store
        self.queue = queue
        self.labels = labels
        # Relabel keys as the catalog gave them (a label keeps its digit), else in the order given.
        self.digits = digits if digits is not None else dict(enumerate(labels[:9], start=1))
        self.seen: tuple[str, int | None] | None = None
        self.reviewer = reviewer
        self.protocol = protocol or detect_protocol()
        self.reviewed = reviewed_ids(session, queue)
        self.history: list[Decision] = []
        self.stats = SessionStats()
        self.message = ""

    def first_unreviewed(self, start: int = 0) -> int:
        for index in range(start, len(self.queue)):
            if self.queue[index] not in self.reviewed:
                return index
        return len(self.queue)

    def run(self) -> SessionStats:
        position = self.first_unreviewed()
        if position >= len(self.queue):
            self.message = "every image of this filter was reviewed before: b to go back, q to quit"
        elif self.reviewed:
            self.message = f"resuming at image {position + 1} of {len(self.queue)} ({len(self.reviewed)} reviewed before)"
        while True:
            self.draw(position)
            key = self.read_key()
            if key == "q":
                break
            if key == "?":
                click.clear()
                click.echo(HELP)
                click.echo("(any key to go back)")
                self.read_key()
                continue
            if key in ("b",) + LEFT:
                position = max(0, position - 1)
                continue
            if key in RIGHT:
                position = min(len(self.queue), position + 1)
                continue
            if key == "u":
                position = self.undo_last(position)
                continue
            if position >= len(self.queue):
                self.message = "every image of this filter is reviewed: b to go back, q to quit"
                continue
            image_id = self.queue[position]
            if key == "s":
                position = self.first_unreviewed(position + 1)
            elif key == "o":
                click.launch(str(self.store.path(image_card(self.session, image_id).store_path)))
            elif key in ("k", " "):
                position = self.record(position, image_id, "keep")
            elif key == "d":
                position = self.record(position, image_id, "delete")
            elif key == "r":
                label = self.read_label()
                if label:
                    position = self.record(position, image_id, "relabel", label)
            elif key.isdigit() and int(key) in self.digits:
                position = self.record(position, image_id, "relabel", self.digits[int(key)])
            elif key == "a" and self.suggested:
                position = self.record(position, image_id, "relabel", self.suggested)
            elif key == "a":
                self.message = "no suggested label for this image (a accepts an audit's suggestion)"
            else:
                self.message = f"unknown key {key!r}; ? for help"
        return self.stats

    def record(self, position: int, image_id: int, action: str, label: str | None = None) -> int:
        create = False
        if label and not label_exists(self.session, label):
            click.echo(f"\r\x1b[2Klabel {label!r} does not exist{did_you_mean(self.session, label) or ';'} "
                       "create it? [y/N] ", nl=False)
            if self.read_key().lower() != "y":
                self.message = f"not relabelled: no label {label!r}"
                return position
            create = True
        try:
            decision = decide(self.session, self.store, image_id, action, label, self.reviewer,
                              create_label=create, seen=self.seen)
        except FastclassError as exc:
            self.message = str(exc)
            return position
        self.history.append(decision)
        self.reviewed.add(image_id)
        self.stats.counts[action] += 1
        if label and label not in self.labels:
            self.labels.append(label)
            self.digits = relabel_digits(self.session)
        what = {"keep": "kept", "delete": "deleted", "relabel": f"relabelled {decision.old_label} -> {decision.new_label}"}
        self.message = f"image {image_id} {what[action]}"
        return position + 1

    def undo_last(self, position: int) -> int:
        if not self.history:
            self.message = "nothing to undo in this session (`fastclass reviews` lists older decisions)"
            return position
        last = self.history.pop()
        try:
            undo(self.session, self.store, last.review_id, self.reviewer)
        except FastclassError as exc:
            self.message = str(exc)
            return position
        self.reviewed.discard(last.image_id)
        self.reviewed |= reviewed_ids(self.session, [last.image_id])
        self.stats.counts["undo"] += 1
        if last.action in self.stats.counts:
            self.stats.counts[last.action] -= 1
        self.message = f"undid {last.action} of image {last.image_id}"
        return self.queue.index(last.image_id) if last.image_id in self.queue else position

    def read_label(self) -> str | None:
        typed = ""
        while True:
            matches = [name for name in self.labels if name.startswith(typed)]
            click.echo(f"\r\x1b[2Krelabel to: {typed}" + (f"   [{', '.join(matches[:6])}]" if typed else ""),
                       nl=False)
            key = self.read_key()
            if key in ENTER:
                click.echo()
                return typed.strip() or None
            if key == ESC:
                click.echo()
                return None
            if key in BACKSPACE:
                typed = typed[:-1]
            elif key == TAB and matches:
                typed = _common_prefix(matches)
            elif len(key) == 1 and key.isprintable():
                typed += key

    def draw(self, position: int) -> None:
        width, height = shutil.get_terminal_size((100, 40))
        click.clear()
        if position >= len(self.queue):
            click.echo(f"All {len(self.queue)} image(s) of this filter are reviewed. b: back, u: undo, q: quit.")
        else:
            card = image_card(self.session, self.queue[position], self.run_id, self.audit_id)
            self.seen = (card.status, card.label_id)
            self.suggested = None
            rows = max(4, height - 9)
            path = self.store.path(card.store_path)
            try:
                click.echo(render(load_for_preview(str(path)), self.protocol, min(width, rows * 4), rows), nl=False)
            except (OSError, ValueError) as exc:
                click.echo(f"(no preview: {exc.__class__.__name__}: {str(exc)[:80]})")
            state = "reviewed" if card.id in self.reviewed else "not reviewed"
            click.echo(printable(f"image {card.id} ({position + 1}/{len(self.queue)}, {state})  {card.sha256[:12]}  "
                       f"label: {card.label}  status: {card.status}  {card.width}x{card.height} {card.format} "
                       f"{card.nbytes // 1024} KB" + (f"  reason: {card.reason}" if card.reason else "")))
            for engine, uri, claim in card.sources[:3]:
                click.echo(printable(f"source: {engine} [{claim}] {uri}")[:width - 1])
            if len(card.sources) > 3:
                click.echo(f"  (+{len(card.sources) - 3} more: `fastclass image {card.id}`)")
            if card.conflict:
                click.echo(printable(f"LABEL CONFLICT ({'sources claim' if card.conflict == 'labels' else 'near-copies carry'} "
                                     f"{', '.join(card.claimed_labels or card.group_labels)}): k keeps {card.label}, "
                                     "a digit or r picks another"))
            if card.prediction is not None:
                verdict = card.prediction
                agrees = "agrees" if verdict.predicted == card.label else "DISAGREES"
                click.echo(f"run {self.run_id} ({verdict.split}): predicted {verdict.predicted} "
                           f"p={verdict.probability:.3f}, loss {verdict.loss:.3f} ({agrees} with the label)")
            if card.audit is not None and card.audit.label_issue:
                if card.audit.suggested != card.label:
                    self.suggested = card.audit.suggested
                click.echo(printable(f"audit {self.audit_id}: LABEL ISSUE: the classifier that never saw this image "
                                     f"says {card.audit.suggested} (label quality {card.audit.label_quality:.3f})"
                                     + (f": a accepts {self.suggested}" if self.suggested else "")))
            elif card.audit is not None and card.audit.outlier:
                click.echo(f"audit {self.audit_id}: OUTLIER: far from every class (score "
                           f"{card.audit.outlier_score:.3f}); off-topic? d deletes")
            if card.group_id is not None:
                click.echo(f"duplicate group {card.group_id}: {card.group_size} image(s), labels "
                           f"{', '.join(card.group_labels)}")
        numbers = printable("  ".join(f"{n}:{name}" for n, name in sorted(self.digits.items())))
        click.echo(f"k keep  d delete  r relabel  {numbers}  s skip  b back  u undo  o open  ? help  q quit")
        click.echo(self.stats.line(len(self.reviewed), len(self.queue)))
        if self.message:
            click.echo(self.message)
            self.message = ""


def _common_prefix(names: list[str]) -> str:
    first, last = min(names), max(names)
    n = 0
    while n < len(first) and first[n] == last[n]:
        n += 1
    return first[:n]
