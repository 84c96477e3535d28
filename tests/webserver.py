"""A real HTTP server on 127.0.0.1 for crawl tests: engine result pages in each engine's real format,
image bytes, and the misbehaving URLs the crawler must survive. Counts every request by path."""
from __future__ import annotations

import contextlib
import functools
import gzip
import html
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


@functools.lru_cache(maxsize=1)
def gzip_bomb() -> bytes:
    """About 500 KB that inflate to 512 MB."""
    return gzip.compress(bytes(512 * 1024 * 1024), compresslevel=9)


class EngineSite:
    """Serves /images/async (Bing), /search/acjson (Baidu), /search (Google), /services/rest (Flickr),
    /page/<name> (plain HTML for greedy), /img/<name> (registered bytes) and special failing paths."""

    def __init__(self, delay: float = 0.0) -> None:
        self.images: dict[str, tuple[bytes, str]] = {}
        self.results: dict[str, list[str]] = {}
        self.pages: dict[str, str] = {}
        self.hits: Counter = Counter()
        self.delay = delay
        self.slow_seconds = 3.0
        self.lock = threading.Lock()
        self.broken_markup = False
        self.drip_seconds = 0.2
        self.refuse_paths: set[str] = set()
        self.requests: list[str] = []
        """Every request's path and query, in order."""
        self.ddg_per_page = 100
        self.ddg_refuse_from: int | None = None
        self.ddg_requests: list[dict] = []
        self.redirect_to = "http://169.254.169.254/latest/meta-data/"
        self.closing = threading.Event()
        self.engine_refusal: int | None = None
        site = self

        class Handler(BaseHTTPRequestHandler):
            disable_nagle_algorithm = True

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                with site.lock:
                    site.hits[parts.path] += 1
                    site.requests.append(self.path)
                    count = site.hits[parts.path]
                try:
                    site.route(self, parts.path, parse_qs(parts.query), count)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def add_image(self, name: str, data: bytes, content_type: str = "image/jpeg") -> str:
        self.images[name] = (data, content_type)
        return self.url(f"/img/{name}")

    def close(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()

    # -- responses ------------------------------------------------------------------------------
    def route(self, h: BaseHTTPRequestHandler, path: str, query: dict, count: int) -> None:
        if path in self.refuse_paths:
            return self.send(h, 403, b"<html>blocked</html>", "text/html")
        if path == "/images/async" and self.engine_refusal:
            h.send_response(self.engine_refusal)
            h.send_header("Retry-After", "0")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return None
        if path == "/images/async":
            return self.send(h, 200, self.bing_page(query), "text/html; charset=utf-8")
        if path == "/search/acjson":
            return self.send(h, 200, self.baidu_json(query), "application/json")
        if path == "/search":
            return self.send(h, 200, self.google_page(query), "text/html; charset=utf-8")
        if path == "/" and "iax" in query:
            return self.send(h, 200, self.ddg_page(query), "text/html; charset=utf-8")
        if path == "/i.js":
            return self.ddg_json(h, query)
        if path == "/services/rest/":
            return self.send(h, 200, self.flickr_json(query), "application/json")
        if path.startswith("/page/"):
            body = self.pages.get(path[len("/page/"):])
            return self.send(h, 200 if body else 404, (body or "no such page").encode(), "text/html")
        if path.startswith("/img/"):
            if self.delay:
                time.sleep(self.delay)
            found = self.images.get(path[len("/img/"):])
            if found is None:
                return self.send(h, 404, b"<html>not found</html>", "text/html")
            return self.send(h, 200, found[0], found[1])
        if path == "/special/html.jpg":
            return self.send(h, 200, b"<!DOCTYPE html><html><body>Access denied</body></html>", "image/jpeg")
        if path == "/special/html-typed.jpg":
            return self.send(h, 200, b"<html><body>error page</body></html>", "text/html")
        if path == "/special/missing.jpg":
            return self.send(h, 404, b"gone", "text/plain")
        if path == "/special/slow.jpg":
            time.sleep(self.slow_seconds)
            return self.send(h, 200, b"late", "image/jpeg")
        if path == "/special/huge.jpg":
            # No Content-Length: the cap must hold while streaming.
            h.send_response(200)
            h.send_header("Content-Type", "image/jpeg")
            h.end_headers()
            chunk = b"\xff" * 65536
            for _ in range(64):
                h.wfile.write(chunk)
            return None
        if path == "/special/loop.jpg":
            h.send_response(302)
            h.send_header("Location", "/special/loop.jpg")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return None
        if path.startswith("/hostile/"):
            return self.hostile(h, path[len("/hostile/"):])
        if path.startswith("/special/busy/"):
            if count == 1:
                h.send_response(429)
                h.send_header("Retry-After", "1")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return None
            data = self.images[path[len("/special/busy/"):]]
            return self.send(h, 200, data[0], data[1])
        return self.send(h, 404, b"unknown", "text/plain")

    def hostile(self, h: BaseHTTPRequestHandler, name: str) -> None:
        """Responses meant to exhaust a client: a gzip bomb, an endless chunked body, a byte-a-moment drip,
        and a redirect to an address the client must refuse."""
        if name.startswith("gzip-bomb"):
            h.send_response(200)
            h.send_header("Content-Type", "text/html" if name.endswith("page") else "image/jpeg")
            h.send_header("Content-Encoding", "gzip")
            h.send_header("Content-Length", str(len(gzip_bomb())))
            h.end_headers()
            h.wfile.write(gzip_bomb())
            return None
        if name.startswith("endless"):
            h.protocol_version = "HTTP/1.1"
            h.send_response(200)
            h.send_header("Content-Type", "text/html" if name.endswith("page") else "image/jpeg")
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            chunk = b"<p>" + b"x" * 65530 + b"</p>"
            with contextlib.suppress(OSError):
                while not self.closing.is_set():
                    h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            return None
        if name.startswith("drip"):
            h.send_response(200)
            h.send_header("Content-Type", "text/html" if name.endswith("page") else "image/jpeg")
            h.send_header("Content-Length", "1000000")
            h.end_headers()
            with contextlib.suppress(OSError):
                for _ in range(600):
                    if self.closing.wait(self.drip_seconds):
                        break
                    h.wfile.write(b"\xff")
                    h.wfile.flush()
            return None
        if name.startswith("redirect"):
            h.send_response(302)
            h.send_header("Location", self.redirect_to)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return None
        return self.send(h, 404, b"unknown", "text/plain")

    @staticmethod
    def send(h: BaseHTTPRequestHandler, code: int, body: bytes, content_type: str) -> None:
        h.send_response(code)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def result_urls(self, query: str, offset: int, per_page: int) -> list[str]:
        urls = self.results.get(query, self.results.get("*", []))
        return urls[offset:offset + per_page]

    def bing_page(self, query: dict) -> bytes:
        """Bing's /images/async answer: one div.imgpt per result, the metadata JSON in the `m` attribute."""
        offset = int(query.get("first", ["0"])[0])
        urls = self.result_urls(query.get("q", [""])[0], offset, 20)
        if self.broken_markup:
            return b"<html><body><div class='newlayout'>" + b"".join(
                f"<figure data-src='{u}'></figure>".encode() for u in urls) + b"</div></body></html>"
        items = []
        for n, url in enumerate(urls):
            meta = {"sid": "", "cid": f"c{offset + n}", "purl": self.url(f"/page/source{offset + n}"),
                    "murl": url, "turl": f"https://tse1.mm.bing.net/th?id=OIP.{offset + n}", "md5": "0" * 32,
                    "shkey": "", "t": f"result {offset + n}", "mid": "", "desc": ""}
            items.append(
                f'<div class="imgpt"><a class="iusc" style="height:160px;width:240px" '
                f'm="{html.escape(json.dumps(meta))}" mad="{{}}" href="/images/search?view=detailV2&amp;id={n}">'
                f'<div class="img_cont hoff"><img class="mimg" height="160" width="240" '
                f'src="https://tse1.mm.bing.net/th?id=OIP.{n}" alt="result"/></div></a>'
                f'<div class="img_info hon"><span class="nowrap">640 x 480 · jpeg</span></div></div>')
        return ('<!DOCTYPE html><html><body><ul class="dgControl_list">'
                + "".join(f'<li data-idx="{i}">{item}</li>' for i, item in enumerate(items))
                + "</ul></body></html>").encode()

    DDG_VQD = "4-211276329716118468713371357133466951023"

    def ddg_page(self, query: dict) -> bytes:
        """DuckDuckGo's search page: the token for the JSON API sits in a script."""
        return (f'<!DOCTYPE html><html><head><script>DDG.deep.initialize("/d.js?q={html.escape(query["q"][0])}'
                f'&l=us-en&s=0&dl=en&ct=US&ss_mkt=us&vqd="{self.DDG_VQD}"&p_ent=&ex=-1");</script></head>'
                '<body><div id="zero_click_wrapper"></div></body></html>').encode()

    def ddg_json(self, h: BaseHTTPRequestHandler, query: dict) -> None:
        """DuckDuckGo's i.js: `results` with image, thumbnail, url, title, width, height, source; `next` names
        the following page. A wrong token, or a page at or past ddg_refuse_from, is refused with 403."""
        with self.lock:
            self.ddg_requests.append(query)
        offset = int(query.get("s", ["0"])[0])
        if query.get("vqd", [""])[0] != self.DDG_VQD or (self.ddg_refuse_from is not None and
                                                          offset >= self.ddg_refuse_from):
            return self.send(h, 403, b"", "text/html")
        text = query.get("q", [""])[0]
        everything = self.results.get(text, self.results.get("*", []))
        urls = everything[offset:offset + self.ddg_per_page]
        data = {"query": text, "queryEncoded": text, "ads": None, "vqd": {text: self.DDG_VQD},
                "results": [{"height": 480, "width": 640, "image": u, "image_token": f"t{offset + n}",
                             "source": "Bing", "thumbnail": f"https://tse2.mm.bing.net/th?id=OIP.{offset + n}",
                             "title": f"result {offset + n}", "url": self.url(f"/page/ddg{offset + n}")}
                            for n, u in enumerate(urls)]}
        if offset + self.ddg_per_page < len(everything) or self.ddg_refuse_from is not None:
            data["next"] = f"i.js?q={text}&o=json&p=1&s={offset + self.ddg_per_page}&u=bing&f=,,,&l=us-en"
        return self.send(h, 200, json.dumps(data).encode(), "application/json")

    def baidu_json(self, query: dict) -> bytes:
        """Baidu's acjson answer; hoverURL carries the image (objURL is Baidu's obfuscated copy)."""
        offset = int(query.get("pn", ["0"])[0])
        urls = self.result_urls(query.get("word", [""])[0], offset, 30)
        data = [{"thumbURL": u + "?thumb", "hoverURL": u, "width": 640, "height": 480, "type": "jpg",
                 "fromPageTitle": "result"} for u in urls]
        return json.dumps({"queryEnc": "q", "listNum": len(data), "displayNum": len(data), "bdIsClustered": "1",
                           "data": data + [{}]}).encode()

    def google_page(self, query: dict) -> bytes:
        """Google's image results page: the result list lives in an AF_initDataCallback script."""
        offset = int(query.get("start", ["0"])[0])
        urls = self.result_urls(query.get("q", [""])[0], offset, 100)
        data = [[1, [0, f"id{n}", [f"https://encrypted-tbn0.gstatic.com/images?q=tbn{n}", 160, 240],
                     [u, 480, 640]]] for n, u in enumerate(urls)]
        script = f"AF_initDataCallback({{key: 'ds:1', hash: '2', data:{json.dumps(data)}, sideChannel: {{}}}});"
        return (f"<!doctype html><html><head><script nonce=\"x\">{script}</script></head>"
                f"<body><div id=\"islrg\"></div></body></html>").encode()

    def flickr_json(self, query: dict) -> bytes:
        method = query.get("method", [""])[0]
        if method == "flickr.photos.search":
            per_page = int(query.get("per_page", ["100"])[0])
            page = int(query.get("page", ["1"])[0])
            urls = self.result_urls(query.get("text", [""])[0], (page - 1) * per_page, per_page)
            photos = [{"id": str((page - 1) * per_page + n), "owner": "o", "secret": "s", "server": "1",
                       "farm": 1, "title": "t", "ispublic": 1} for n in range(len(urls))]
            return json.dumps({"photos": {"page": page, "pages": 1, "perpage": per_page, "total": len(photos),
                                          "photo": photos}, "stat": "ok"}).encode()
        if method == "flickr.photos.getSizes":
            urls = self.results.get("*", [])
            index = int(query.get("photo_id", ["0"])[0])
            if index >= len(urls):
                return json.dumps({"stat": "fail", "code": 1, "message": "Photo not found"}).encode()
            return json.dumps({"sizes": {"canblog": 0, "size": [
                {"label": "Thumbnail", "width": 100, "height": 75, "source": urls[index] + "?t"},
                {"label": "Large", "width": 1024, "height": 768, "source": urls[index]}]}, "stat": "ok"}).encode()
        return json.dumps({"stat": "fail", "code": 112, "message": "Method not found"}).encode()
