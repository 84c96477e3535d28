"""Make docs/images/gallery-grid.png, gallery-loss.png, gallery-groups.png and gallery-image.png: the real
`fastclass serve` on a copy of the demo catalog, in Debian's headless chromium through Playwright, after a
few real key presses.

Run after `make demo`: .venv/bin/python docs/gallery_screenshot.py
The demo catalog is copied first, so the decisions taken for the picture do not land in it.
"""
from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    work = Path(tempfile.mkdtemp()) / "demo"
    shutil.copytree(ROOT / "demo", work, symlinks=True)
    server = subprocess.Popen([sys.executable, "-m", "fastclass", "--catalog", str(work / "fastclass.db"), "serve",
                               "--port", "0", "--no-open"], stdout=subprocess.PIPE, text=True)
    try:
        url = re.search(r"at (\S+) \(Ctrl-C", server.stdout.readline()).group(1)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"{url}grid?label=temple")
            page.wait_for_function("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
            page.keyboard.press("d")
            page.wait_for_selector('.tile[data-status="deleted"]')
            for _ in range(3):
                page.keyboard.press("Shift+ArrowRight")
            page.screenshot(path=str(ROOT / "docs" / "images" / "gallery-grid.png"))
            first = page.get_attribute(".tile", "data-id")
            for view, name in (("grid?order=loss&run=1", "gallery-loss.png"), ("groups", "gallery-groups.png")):
                page.goto(f"{url}{view}")
                page.wait_for_function("Array.from(document.images).every(i => i.complete)")
                page.screenshot(path=str(ROOT / "docs" / "images" / name))
            page.goto(f"{url}image/{first}")
            page.wait_for_function("document.images[0].complete")
            page.screenshot(path=str(ROOT / "docs" / "images" / "gallery-image.png"))
            browser.close()
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=10)
        shutil.rmtree(work.parent, ignore_errors=True)


def shrink(path: Path) -> None:
    """The screenshot in 256 colours: a third of the bytes, the same picture to the eye."""
    from PIL import Image

    with Image.open(path) as picture:
        picture.convert("RGB").quantize(256, dither=Image.Dither.NONE).save(path, optimize=True)


if __name__ == "__main__":
    main()
    for name in ("gallery-grid.png", "gallery-loss.png", "gallery-groups.png", "gallery-image.png"):
        shrink(ROOT / "docs" / "images" / name)
