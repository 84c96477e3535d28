"""Make docs/images/clean.png: the real `fastclass clean` prompt on the demo catalog, captured in a
pseudo-terminal and painted cell by cell (half blocks in their colours, text in a bitmap font).

Run after `make demo`: .venv/bin/python docs/clean_screenshot.py
The demo catalog is copied first, so the decisions taken for the picture do not land in it.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pexpect
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
CELL_W, CELL_H = 8, 16
ESCAPE = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")


def capture(columns: int = 96, rows: int = 26) -> str:
    work = Path(tempfile.mkdtemp()) / "demo"
    shutil.copytree(ROOT / "demo", work, symlinks=True)
    env = {"TERM": "xterm-256color", "COLORTERM": "truecolor", "PATH": os.environ["PATH"],
           "FASTCLASS_REVIEWER": "demo", "LANG": "C.UTF-8"}
    child = pexpect.spawn(sys.executable, ["-m", "fastclass", "--catalog", str(work / "fastclass.db"), "clean",
                                           "--label", "temple"], encoding="utf-8", timeout=30,
                          dimensions=(rows, columns), env=env)
    transcript = io.StringIO()
    child.logfile_read = transcript
    child.expect("q quit")
    for key in "kkd":
        child.send(key)
        child.expect("image [0-9]+ (kept|deleted)")
    child.expect("\n")
    child.send("q")
    child.expect(pexpect.EOF)
    screens = transcript.getvalue().split("\x1b[2J")
    shutil.rmtree(work.parent, ignore_errors=True)
    return screens[-1].split("Saved:")[0]


def paint(screen: str, columns: int = 96) -> Image.Image:
    lines = screen.replace("\r", "").strip("\n").split("\n")
    img = Image.new("RGB", (columns * CELL_W + 16, len(lines) * CELL_H + 16), (24, 24, 24))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for row, line in enumerate(lines):
        x, fg, bg = 0, (220, 220, 220), None
        pos = 0
        while pos < len(line):
            match = ESCAPE.match(line, pos)
            if match:
                params = [int(p) for p in match.group(1).split(";") if p.isdigit()]
                if match.group(2) == "m":
                    if params[:2] == [38, 2]:
                        fg = tuple(params[2:5])
                    elif params[:2] == [48, 2]:
                        bg = tuple(params[2:5])
                    elif params in ([0], [49], []):
                        fg, bg = (220, 220, 220), None
                pos = match.end()
                continue
            char = line[pos]
            left, top = 8 + x * CELL_W, 8 + row * CELL_H
            if char == "\u2580":
                draw.rectangle([left, top, left + CELL_W - 1, top + CELL_H // 2 - 1], fill=fg)
                if bg is not None:
                    draw.rectangle([left, top + CELL_H // 2, left + CELL_W - 1, top + CELL_H - 1], fill=bg)
            elif char != " ":
                draw.text((left, top + 2), char, fill=fg, font=font)
            x += 1
            pos += 1
    return img


def main() -> None:
    out = ROOT / "docs" / "images" / "clean.png"
    out.parent.mkdir(exist_ok=True)
    paint(capture()).save(out, optimize=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
