"""bench/serve: the review gallery on a 20,000-image catalog, measured in a real headless Chromium.

Run: .venv/bin/python bench/serve.py [--images 20000]   (writes "Review gallery" in docs/benchmarks.md)
Needs Debian's chromium and the dev extra (Playwright); the wrk row needs Debian's wrk.

A fresh SQLite catalog gets --images real JPEGs (320x240 crops of the sample photos, 10 labels) through
`import` and `verify`; `fastclass serve` runs as its own process. Measured:
- a 200-thumbnail grid page (one label's first page) in a fresh Chromium context (nothing cached in the
  browser), 1600x900: time to the page's DOMContentLoaded, to the first screen's thumbnails decoded (the
  first render), and to all 200 decoded (the page asks for them all at once, those in view first),
  with a cold thumbnail cache (the server makes each one from the original) and warm (made before);
  median of 5 pages, each a different label;
- cached thumbnails per second: Chromium fetching 4,000 cached thumbnails, 6 at a time (as many as it
  opens to one host), its own cache bypassed; and wrk (Debian's `wrk`, a load generator in C) over the
  same thumbnails for 10 s, which takes far less of the shared CPU than Chromium does;
- decisions through the HTTP API: 500 `keep` POSTs one after another, each committed before its answer,
  latency median and 95th percentile.
With a parallelism probe, since the server and the browser share the two cores.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, write_section  # noqa: E402
from bench.ingest import parallelism_probe  # noqa: E402

LABELS = 10
PAGES = 5


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fastclass(catalog: str, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "fastclass", "--catalog", catalog, "-q", *args],
                            capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"fastclass {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return result.stdout


def make_catalog(folder: Path, images: int) -> tuple[str, float]:
    from fastclass.sample import write_web_jpegs

    started = time.perf_counter()
    for label in range(LABELS):
        write_web_jpegs(folder / "in" / f"label{label}", images // LABELS, (320, 240), seed=label)
    catalog = str(folder / "catalog.db")
    fastclass(catalog, "init", "--store", str(folder / "store"))
    fastclass(catalog, "import", str(folder / "in"))
    fastclass(catalog, "verify")
    return catalog, time.perf_counter() - started


def grid_page(browser, url: str, label: int) -> tuple[float, float, float]:
    """(s to DOMContentLoaded, s to the first screen's thumbnails decoded, s to all 200 decoded) for one
    label's first grid page, in a fresh browser context (nothing cached in the browser) that has already
    loaded a small page from the server."""
    context = browser.new_context(viewport={"width": 1600, "height": 900})
    page = context.new_page()
    page.goto(f"{url}static/gallery.css")
    started = time.perf_counter()
    page.goto(f"{url}grid?label=label{label}", wait_until="domcontentloaded")
    dom = time.perf_counter() - started
    page.wait_for_function("Array.from(document.images).filter(i => i.getBoundingClientRect().top < innerHeight)"
                           ".every(i => i.complete && i.naturalWidth > 0)", timeout=120_000, polling=10)
    screen = time.perf_counter() - started
    page.wait_for_function("document.images.length === 200 && Array.from(document.images).every("
                           "i => i.complete && i.naturalWidth > 0)", timeout=120_000, polling=20)
    loaded = time.perf_counter() - started
    context.close()
    return dom, screen, loaded


def thumbnails_per_second(browser, url: str, ids: list[int], parallel: int = 6) -> float:
    """Cached thumbnails fetched by Chromium itself (its network stack, `parallel` requests in flight, as
    many as it opens to one host, its own cache bypassed), per second."""
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{url}static/gallery.css")
    seconds = page.evaluate("""async ([ids, parallel]) => {
        let next = 0;
        const worker = async () => {
            while (next < ids.length) {
                const response = await fetch("/thumb/" + ids[next++] + "?s=256", { cache: "no-store" });
                if (!response.ok) throw new Error("thumbnail " + response.status);
                await response.arrayBuffer();
            }
        };
        const started = performance.now();
        await Promise.all(Array.from({ length: parallel }, worker));
        return (performance.now() - started) / 1000;
    }""", [ids, parallel])
    context.close()
    return len(ids) / seconds


WRK_SCRIPT = """
local paths = {}
for line in io.lines("%s") do paths[#paths + 1] = line end
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", paths[(n %% #paths) + 1])
end
"""


def wrk_thumbnails_per_second(url: str, ids: list[int], folder: Path) -> float | None:
    """Cached thumbnails per second to wrk (a C load generator, 8 keep-alive connections, 10 s), or None
    when wrk is not installed (apt-get install wrk)."""
    if shutil.which("wrk") is None:
        return None
    (folder / "paths.txt").write_text("".join(f"/thumb/{i}?s=256\n" for i in ids))
    (folder / "paths.lua").write_text(WRK_SCRIPT % (folder / "paths.txt"))
    done = subprocess.run(["wrk", "-t1", "-c8", "-d10s", "-s", str(folder / "paths.lua"), url], capture_output=True,
                          text=True, check=True)
    return float(re.search(r"Requests/sec:\s+([\d.]+)", done.stdout).group(1))


def decision_latencies(url: str, rows: list[tuple[int, int]]) -> list[float]:
    import requests

    with requests.Session() as session:
        csrf = re.search(r'name="csrf" content="([^"]+)"', session.get(f"{url}grid").text).group(1)
        latencies = []
        for image_id, label_id in rows:
            body = {"images": [{"id": image_id, "status": "ok", "label_id": label_id}], "action": "keep"}
            started = time.perf_counter()
            response = session.post(f"{url}api/decide", data=json.dumps(body),
                                    headers={"content-type": "application/json", "x-fastclass-csrf": csrf})
            latencies.append(time.perf_counter() - started)
            response.raise_for_status()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    args = parser.parse_args()
    import sqlite3

    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as work:
        catalog, built = make_catalog(Path(work), args.images)
        with sqlite3.connect(catalog) as conn:
            rows = conn.execute("SELECT id, label_id FROM images WHERE status = 'ok' ORDER BY id").fetchall()
        server = subprocess.Popen([sys.executable, "-m", "fastclass", "--catalog", catalog, "serve", "--port", "0",
                                   "--no-open"], stdout=subprocess.PIPE, text=True)
        try:
            url = re.search(r"at (\S+) \(Ctrl-C", server.stdout.readline()).group(1)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
                grid_page(browser, url, LABELS - 1)  # the browser and the server's imports, once
                cpu = cpu_seconds(server.pid)
                cold = [grid_page(browser, url, label) for label in range(PAGES)]
                cold_cpu, cpu = (cpu_seconds(server.pid) - cpu) / PAGES, cpu_seconds(server.pid)
                warm = [grid_page(browser, url, label) for label in range(PAGES)]
                warm_cpu = (cpu_seconds(server.pid) - cpu) / PAGES
                # The thumbnails of the pages shown are in the cache now.
                import requests

                first_pages = [int(i) for label in range(PAGES) for i in re.findall(
                    r'data-id="(\d+)"', requests.get(f"{url}grid?label=label{label}").text)]
                cached = first_pages * (4000 // len(first_pages))
                cpu = cpu_seconds(server.pid)
                per_second = thumbnails_per_second(browser, url, cached)
                thumb_cpu = (cpu_seconds(server.pid) - cpu) / len(cached)
                browser.close()
            to_wrk = wrk_thumbnails_per_second(url, first_pages, Path(work))
            cpu = cpu_seconds(server.pid)
            latencies = decision_latencies(url, rows[-500:])
            decision_cpu = (cpu_seconds(server.pid) - cpu) / len(latencies)
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=30)
    probe = parallelism_probe()
    median = statistics.median
    latencies.sort()
    body = f"""Written by `bench/serve.py` on {machine()}.
Parallelism probe: two processes got {probe:.2f} cores' worth (the server, Chromium and the clients share them).

A catalog of {len(rows):,} `ok` images (320x240 JPEGs, {LABELS} labels; written, imported and verified in
{built:.0f} s), `fastclass serve` in its own process, Chromium headless through Playwright. A grid page is
one label's first 200 thumbnails (256 px), in a fresh Chromium context (nothing cached in the browser),
1600x900: the first screen's thumbnails (the first render) and all 200 (the page loads them all at once,
those in view first);
median of {PAGES} pages, each another label. Server CPU: the `serve` process's CPU seconds over the same
requests (the rest of the wall time is Chromium's, on the same two cores).

| measure | figure | server CPU | target |
|---|---|---|---|
| grid page, cold thumbnail cache: HTML parsed (DOMContentLoaded) | {median(r[0] for r in cold):.2f} s | | |
| grid page, cold thumbnail cache: first screen's thumbnails shown | {median(r[1] for r in cold):.2f} s | | <= 5 s |
| grid page, cold thumbnail cache: all 200 thumbnails shown | {median(r[2] for r in cold):.2f} s | {cold_cpu:.2f} s per page | |
| grid page, warm thumbnail cache: HTML parsed | {median(r[0] for r in warm):.2f} s | | |
| grid page, warm thumbnail cache: first screen's thumbnails shown | {median(r[1] for r in warm):.2f} s | | <= 1 s |
| grid page, warm thumbnail cache: all 200 thumbnails shown | {median(r[2] for r in warm):.2f} s | {warm_cpu:.2f} s per page | |
| cached thumbnails served to Chromium (6 in flight, {len(cached):,} requests) | {per_second:,.0f} /s | {thumb_cpu * 1e3:.2f} ms each ({1 / thumb_cpu:,.0f} /s per core) | >= 1,000 /s |
| cached thumbnails served to wrk (8 keep-alive connections, 10 s) | {f"{to_wrk:,.0f} /s" if to_wrk else "wrk not installed"} | | >= 1,000 /s |
| a decision through `/api/decide`, committed (500 one after another): median | {median(latencies) * 1e3:.1f} ms | {decision_cpu * 1e3:.1f} ms each | <= 50 ms |
| the same, 95th percentile | {latencies[int(len(latencies) * 0.95)] * 1e3:.1f} ms | | |
"""
    write_section("Review gallery", body)
    print(body)


if __name__ == "__main__":
    main()
