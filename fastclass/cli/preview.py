"""Images in a terminal: kitty and iTerm2 inline-image protocols, sixel, or colour half-blocks anywhere."""
from __future__ import annotations

import base64
import io
import os
from typing import Mapping

from PIL import Image, ImageOps

PROTOCOLS = ("kitty", "iterm", "sixel", "halfblock")
ENV_PREVIEW = "FASTCLASS_PREVIEW"


def detect_protocol(env: Mapping[str, str] = os.environ) -> str:
    """The best image protocol this terminal speaks, from its environment (FASTCLASS_PREVIEW overrides)."""
    forced = env.get(ENV_PREVIEW, "").lower()
    if forced in PROTOCOLS:
        return forced
    term = env.get("TERM", "")
    if term == "xterm-kitty" or env.get("KITTY_WINDOW_ID") or env.get("TERM_PROGRAM") == "WezTerm":
        return "kitty"
    if env.get("TERM_PROGRAM") == "iTerm.app" or env.get("LC_TERMINAL") == "iTerm2":
        return "iterm"
    if "sixel" in term or term.startswith(("mlterm", "foot")) or env.get("TERM_PROGRAM") == "mintty":
        return "sixel"
    return "halfblock"


def load_for_preview(path: str) -> Image.Image:
    """The image upright (EXIF orientation) in RGB, first frame only."""
    with Image.open(path) as img:
        img.seek(0)
        return ImageOps.exif_transpose(img).convert("RGB")


def render(img: Image.Image, protocol: str, columns: int, rows: int) -> str:
    """Terminal output that draws img within columns x rows character cells."""
    if protocol == "kitty":
        return _kitty(img, columns, rows)
    if protocol == "iterm":
        return _iterm(img, columns, rows)
    if protocol == "sixel":
        return _sixel(img, columns, rows)
    return halfblock(img, columns, rows)


def _fit(img: Image.Image, width: int, height: int) -> Image.Image:
    """img scaled (up or down) to the largest size within width x height that keeps its aspect ratio."""
    scale = min(width / img.width, height / img.height)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.LANCZOS)


def halfblock(img: Image.Image, columns: int, rows: int) -> str:
    """Two pixels per cell: the upper half block in the top pixel's colour on the bottom pixel's colour
    (24-bit colour escapes, which every truecolor terminal understands)."""
    small = _fit(img, columns, rows * 2)
    width, height = small.size
    pixels = small.load()
    lines = []
    for y in range(0, height, 2):
        cells = []
        for x in range(width):
            top = pixels[x, y]
            if y + 1 < height:
                bottom = pixels[x, y + 1]
                cells.append(f"\x1b[38;2;{top[0]};{top[1]};{top[2]}m\x1b[48;2;{bottom[0]};{bottom[1]};{bottom[2]}m\u2580")
            else:
                cells.append(f"\x1b[38;2;{top[0]};{top[1]};{top[2]}m\x1b[49m\u2580")
        lines.append("".join(cells) + "\x1b[0m")
    return "\n".join(lines) + "\n"


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _kitty(img: Image.Image, columns: int, rows: int) -> str:
    data = base64.b64encode(_png(_fit(img, columns * 10, rows * 20))).decode()
    chunks = [data[i:i + 4096] for i in range(0, len(data), 4096)] or [""]
    out = []
    for n, chunk in enumerate(chunks):
        more = 1 if n < len(chunks) - 1 else 0
        head = f"a=T,f=100,c={columns},r={rows},m={more}" if n == 0 else f"m={more}"
        out.append(f"\x1b_G{head};{chunk}\x1b\\")
    return "".join(out) + "\n"


def _iterm(img: Image.Image, columns: int, rows: int) -> str:
    data = _png(_fit(img, columns * 10, rows * 20))
    return (f"\x1b]1337;File=inline=1;size={len(data)};width={columns};height={rows};preserveAspectRatio=1:"
            f"{base64.b64encode(data).decode()}\a\n")


def _sixel(img: Image.Image, columns: int, rows: int) -> str:
    """DEC sixel: a 64-colour palette, six pixel rows per band, run-length encoded."""
    small = _fit(img, columns * 8, rows * 16)
    quantized = small.quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    palette = quantized.getpalette()[:64 * 3]
    width, height = quantized.size
    pixels = quantized.load()
    out = ['\x1bPq"1;1;' + f"{width};{height}"]
    for index in range(len(palette) // 3):
        r, g, b = palette[index * 3:index * 3 + 3]
        out.append(f"#{index};2;{r * 100 // 255};{g * 100 // 255};{b * 100 // 255}")
    for band in range(0, height, 6):
        colours: dict[int, list[int]] = {}
        for x in range(width):
            for bit in range(6):
                y = band + bit
                if y < height:
                    bits = colours.setdefault(pixels[x, y], [0] * width)
                    bits[x] |= 1 << bit
        for colour, bits in colours.items():
            out.append(f"#{colour}" + _rle("".join(chr(63 + b) for b in bits)) + "$")
        out.append("-")
    return "".join(out) + "\x1b\\\n"


def _rle(line: str) -> str:
    out, i = [], 0
    while i < len(line):
        j = i
        while j < len(line) and line[j] == line[i]:
            j += 1
        out.append(f"!{j - i}{line[i]}" if j - i > 3 else line[i] * (j - i))
        i = j
    return "".join(out)
