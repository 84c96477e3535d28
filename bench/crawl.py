"""bench/crawl: end-to-end crawl throughput against a local server that adds 50 ms latency per response.

Run: .venv/bin/python bench/crawl.py [--images 2000] [--latency 0.05]   (writes "Crawl" in docs/benchmarks.md)
The server (a separate process, so it does not share the crawler's interpreter) serves N distinct
web-sized JPEGs from memory. Each fastclass run crawls the URL list (`urls` engine) into a fresh catalog:
download, sha256, format, hashes, store, rows, provenance. The baseline is icrawler 0.6.10's own
UrlListCrawler in its default configuration (1 downloader thread) on the same server. The same server also
answers in DuckDuckGo's formats (the search page with its vqd token, `i.js` JSON pages of 100 results that
name the next one), so the `ddg` engine is measured end to end, result pages included.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, peak_rss_mib, write_section  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "crawl"


DDG_VQD = "4-1234567890"
DDG_PAGE = 100


def ddg_answer(path: str, query: dict, names: list[str], base: str) -> bytes | None:
    """DuckDuckGo's search page (holding the vqd token) and its i.js result pages, over the served files."""
    if path == "/" and "iax" in query:
        return f'<html><head><script>vqd="{DDG_VQD}";</script></head><body></body></html>'.encode()
    if path == "/i.js":
        offset = int(query.get("s", ["0"])[0])
        page = names[offset:offset + DDG_PAGE]
        data = {"results": [{"image": f"{base}/{name}", "url": f"{base}/page/{name}", "title": name,
                             "width": 800, "height": 600, "source": "bench"} for name in page]}
        if offset + DDG_PAGE < len(names):
            data["next"] = f"i.js?q=bench&o=json&p=1&s={offset + DDG_PAGE}&u=bing&f=,,,&l=us-en"
        return json.dumps(data).encode()
    return None


def serve(folder: Path, latency: float) -> None:
    from urllib.parse import parse_qs, urlsplit

    files = {f"/{p.name}": p.read_bytes() for p in folder.glob("*.jpg")}
    names = sorted(name[1:] for name in files)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes; with Nagle's algorithm on, the body waits for the
        # client's delayed ACK (about 40 ms) - a server artefact that real web servers avoid the same way.
        disable_nagle_algorithm = True

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            time.sleep(latency)
            parts = urlsplit(self.path)
            page = ddg_answer(parts.path, parse_qs(parts.query), names,
                              f"http://127.0.0.1:{self.server.server_address[1]}")
            if page is not None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json" if parts.path == "/i.js" else "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)
                return
            body = files.get(parts.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "image/jpeg" if body else "text/plain")
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

    ThreadingHTTPServer.request_queue_size = 256
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


def run_fastclass(urls: Path, n: int, threads: int, per_host: int, ddg: str | None = None) -> dict:
    """One crawl into a fresh catalog: the URL list (urls engine), or with ddg=BASE the ddg engine."""
    work = OUT / f"run-{threads}-{'ddg' if ddg else 'urls'}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    catalog = str(work / "catalog.db")
    subprocess.run([sys.executable, "-m", "fastclass", "--catalog", catalog, "-q", "init"], check=True,
                   capture_output=True)
    started = time.perf_counter()
    source = ["bench", "--engine", "ddg", "--engine-url", f"ddg={ddg}"] if ddg else ["--urls", str(urls), "--allow-private"]
    out = subprocess.run([sys.executable, "-m", "fastclass", "--catalog", catalog, "-q", "crawl", *source,
                          "--label", "bench", "--max", str(n), "--threads", str(threads),
                          "--per-host", str(per_host), "--json"], check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    report = json.loads(out.stdout)
    return {"seconds": report["seconds"], "wall": seconds, "new": report["new_images"],
            "rate": report["new_images"] / report["seconds"], "wall_rate": report["new_images"] / seconds}


def run_icrawler(urls: Path, n: int) -> dict:
    code = f"""
import logging, time, json, sys
logging.disable(logging.CRITICAL)
from icrawler.builtin import UrlListCrawler
crawler = UrlListCrawler(storage={{"root_dir": {str(OUT / "icrawler")!r}}})
started = time.perf_counter()
crawler.crawl({str(urls)!r}, max_num={n})
print(json.dumps({{"seconds": time.perf_counter() - started}}))
"""
    shutil.rmtree(OUT / "icrawler", ignore_errors=True)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    seconds = json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
    files = len(list((OUT / "icrawler").glob("*")))
    return {"seconds": seconds, "new": files, "rate": files / seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--baseline-images", type=int, default=300)
    parser.add_argument("--serve", nargs=2)
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), float(args.serve[1]))
        return
    from fastclass.sample import write_web_jpegs

    images = OUT / "images"
    if len(list(images.glob("*.jpg"))) != args.images:
        shutil.rmtree(images, ignore_errors=True)
        write_web_jpegs(images, args.images, size=(800, 600))
    sizes = [p.stat().st_size for p in images.glob("*.jpg")]
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(images), str(args.latency)],
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        names = sorted(p.name for p in images.glob("*.jpg"))
        urls = OUT / "urls.txt"
        urls.write_text("".join(f"http://127.0.0.1:{port}/{name}\n" for name in names))
        baseline_urls = OUT / "urls-baseline.txt"
        baseline_urls.write_text("".join(f"http://127.0.0.1:{port}/{name}?b\n" for name in names[:args.baseline_images]))
        default = run_fastclass(urls, args.images, 8, 4)
        wide = run_fastclass(urls, args.images, 32, 32)
        ddg_default = run_fastclass(urls, args.images, 8, 4, ddg=f"http://127.0.0.1:{port}")
        ddg_wide = run_fastclass(urls, args.images, 32, 32, ddg=f"http://127.0.0.1:{port}")
        baseline = run_icrawler(baseline_urls, args.baseline_images)
    finally:
        server.terminate()
    ceiling = 32 / args.latency
    lines = [
        f"Machine: {machine()}.",
        "",
        f"Server: {args.images:,} distinct 800x600 JPEGs ({min(sizes) // 1024}-{max(sizes) // 1024} KB, mean "
        f"{sum(sizes) / len(sizes) / 1024:.0f} KB) from memory, {args.latency * 1000:.0f} ms added to every "
        "response, in its own process on the same machine. `python bench/crawl.py`. Seconds are the crawl's own "
        "(job start to end: pages, downloads, checks, hashes, store, catalog); the last column is the whole "
        "command with interpreter start-up and catalog opening (about 1 s).",
        "",
        "| crawler | concurrency | images | seconds | images/s | target | images/s, whole command |",
        "|---|---|---|---|---|---|---|",
        f"| fastclass, default (`--threads 8`, `--per-host 4`: one host, so 4 at once) | 4 | {default['new']:,} | "
        f"{default['seconds']:.1f} | {default['rate']:.0f} | | {default['wall_rate']:.0f} |",
        f"| fastclass `--threads 32 --per-host 32` | 32 | {wide['new']:,} | {wide['seconds']:.1f} | "
        f"{wide['rate']:.0f} | >= {0.7 * ceiling:.0f} (0.7 x 32 / latency) | {wide['wall_rate']:.0f} |",
        f"| fastclass `--engine ddg`, default (result pages of 100 too) | 4 | {ddg_default['new']:,} | "
        f"{ddg_default['seconds']:.1f} | {ddg_default['rate']:.0f} | | {ddg_default['wall_rate']:.0f} |",
        f"| fastclass `--engine ddg --threads 32 --per-host 32` | 32 | {ddg_wide['new']:,} | "
        f"{ddg_wide['seconds']:.1f} | {ddg_wide['rate']:.0f} | >= {0.7 * ceiling:.0f} | {ddg_wide['wall_rate']:.0f} |",
        f"| icrawler 0.6.10 UrlListCrawler, default (1 downloader thread) | 1 | {baseline['new']:,} | "
        f"{baseline['seconds']:.1f} | {baseline['rate']:.1f} | | |",
        "",
        f"fastclass at 32 vs icrawler's default: {wide['rate'] / baseline['rate']:.1f}x (target >= 5x); at its "
        f"own default: {default['rate'] / baseline['rate']:.1f}x. Peak RSS of this driver: {peak_rss_mib():.0f} MiB.",
    ]
    body = "\n".join(lines)
    print(body)
    if args.images >= 2000:
        write_section("Crawl", body)


if __name__ == "__main__":
    main()
