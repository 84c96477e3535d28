"""The review gallery's ASGI app (Starlette, Jinja2 templates, a little plain JavaScript, no CDN).

Every decision goes through fastclass.curate.review (`decide`, `undo`), committed before the answer is
sent, with the state the page showed (`seen`): a decision on an image someone changed since is refused
(409) and the tile is given the current state. Bound to anything but loopback, every request needs the
token printed at start (as `?token=`, then a cookie). Every state-changing request needs the page's CSRF
header and, when the browser sends one, an Origin equal to the server's own: a cross-site form or fetch
cannot add that header, so it is refused.
"""
from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path
from urllib.parse import urlencode

from PIL import Image as PILImage
from PIL import ImageOps
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from db.models import AuditScore, Image, Label, Source
from fastclass.catalog import Catalog
from fastclass.curate.dedup import duplicate_groups
from fastclass.curate.review import (
    ORDERS,
    STATUS_FILTERS,
    audit_with_scores,
    decide,
    loss_table,
    review_page,
    review_signals,
    reviewed_ids,
    run_with_losses,
    undo,
)
from fastclass.dataset.snapshot import list_snapshots, snapshot_items
from fastclass.errors import FastclassError, NotFoundError
from fastclass.labels import label_names, relabel_digits
from fastclass.stats import list_labels

HERE = Path(__file__).parent
PAGE_SIZE = 200
FILES_REMEMBERED = 200_000
"""Image ids whose file the gallery keeps in memory (about 200 bytes each), for thumbnails."""
LIVE_MS = 3000
"""How often a page asks for its tiles' states (what other reviewers decided)."""
LIVE_MAX_IDS = 500
"""At most this many tiles per /api/tiles request (a page holds PAGE_SIZE)."""
THUMB_SIZES = (128, 256, 512)
TOKEN_COOKIE = "fastclass_token"
CSRF_HEADER = "x-fastclass-csrf"


class Gallery:
    """What the handlers share: the catalog, the reviewer, the secrets, the thumbnail cache folder."""

    def __init__(self, catalog: Catalog, reviewer: str, token: str | None) -> None:
        self.catalog, self.reviewer, self.token = catalog, reviewer, token
        self.csrf = secrets.token_urlsafe(24)
        self.thumbs = catalog.work_dir / "thumbs"
        self._files: dict[int, tuple[str, str]] = {}

    def file_of(self, image_id: int) -> tuple[str, str]:
        """(sha256, store path) of an image. Remembered: an image id always names the same bytes (the store
        is content-addressed), so a thumbnail request after the first needs no catalog query."""
        found = self._files.get(image_id)
        if found is None:
            with self.catalog.session() as session:
                image = session.get(Image, image_id)
                if image is None:
                    raise NotFoundError(f"no image with id {image_id} in the catalog")
                found = (image.sha256, image.store_path)
            if len(self._files) >= FILES_REMEMBERED:
                self._files.clear()
            self._files[image_id] = found
        return found

    def thumbnail(self, image_id: int, size: int) -> tuple[Path, str]:
        """The cached JPEG thumbnail of an image (made once per image and size), and its sha256."""
        sha, store_path = self.file_of(image_id)
        path = self.thumbs / str(size) / sha[:2] / f"{sha}.jpg"
        if not path.exists():
            source = self.catalog.store.path(store_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
            with PILImage.open(source) as picture:
                picture = ImageOps.exif_transpose(picture)
                picture.thumbnail((size, size))
                picture.convert("RGB").save(partial, "JPEG", quality=85)
            os.replace(partial, path)
        return path, sha


class _Guard:
    """The token (on a non-loopback bind) and the CSRF rules, before any handler runs. Plain ASGI rather
    than Starlette's BaseHTTPMiddleware, which costs every request (thumbnails most) a task and a stream."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        gallery: Gallery = scope["app"].state.gallery
        refusal = self.refusal(request, gallery)
        if refusal is not None:
            await PlainTextResponse(refusal, status_code=403)(scope, receive, send)
            return
        if gallery.token is None or not request.query_params.get("token"):
            await self.app(scope, receive, send)
            return
        cookie = Response()
        cookie.set_cookie(TOKEN_COOKIE, gallery.token, httponly=True, samesite="strict")
        set_cookie = next(value for name, value in cookie.raw_headers if name == b"set-cookie")

        async def send_with_cookie(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", set_cookie)]}
            await send(message)

        await self.app(scope, receive, send_with_cookie)

    @staticmethod
    def refusal(request: Request, gallery: Gallery) -> str | None:
        if gallery.token is not None:
            given = request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE) or ""
            if not hmac.compare_digest(given, gallery.token):
                return ("refused: this gallery needs the token printed when `fastclass serve` started (open the "
                        "URL it printed)")
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            origin = request.headers.get("origin")
            own = f"{request.url.scheme}://{request.headers.get('host', '')}"
            if origin is not None and origin != own:
                return f"refused: a request from {origin} (cross-site)"
            if not hmac.compare_digest(request.headers.get(CSRF_HEADER, ""), gallery.csrf):
                return "refused: no CSRF header (state changes come from the gallery's own pages)"
        return None


templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.filters["replace_page"] = lambda params, page: urlencode({**dict(params), "page": page})


def _query(request: Request) -> dict:
    q = request.query_params
    status = q.get("status", "ok")
    order = q.get("order", "label")
    if status not in STATUS_FILTERS:
        raise FastclassError(f"unknown status {status!r}; use one of: {', '.join(STATUS_FILTERS)}")
    if order not in ORDERS:
        raise FastclassError(f"unknown order {order!r}; use one of: {', '.join(ORDERS)}")
    try:
        page = max(1, int(q.get("page", "1")))
        audit = int(q["audit"]) if q.get("audit") else None
    except ValueError:
        raise FastclassError("page and audit are numbers") from None
    return {"label": q.get("label") or None, "status": status, "order": order, "run": q.get("run") or None,
            "audit": audit, "page": page}


def index(request: Request) -> Response:
    gallery: Gallery = request.app.state.gallery
    with gallery.catalog.session() as session:
        labels = list_labels(session)
        snapshots = [info.name for info in list_snapshots(session)]
        signals = review_signals(session)
    return templates.TemplateResponse(request, "index.html", {
        "labels": labels, "statuses": STATUS_FILTERS, "catalog": gallery.catalog.display, "snapshots": snapshots,
        **signals})


def _tiles(session, image_ids: list[int], run_id: int | None, audit_id: int | None,
           reviewed: set[int]) -> list[dict]:
    """The tiles of a page, in a handful of queries whatever their number (a page of 200 in one go)."""
    rows = {r.id: r for r in session.execute(
        select(Image.id, Image.status, Image.label_id, Image.conflict, Image.dup_group_id)
        .where(Image.id.in_(image_ids)).execution_options(populate_existing=True))}
    names = label_names(session)
    scores = {} if audit_id is None else {score.image_id: score for score in session.scalars(
        select(AuditScore).where(AuditScore.audit_id == audit_id, AuditScore.image_id.in_(image_ids)))}
    verdicts = {}
    if run_id is not None:
        table = loss_table(session, run_id)
        verdicts = {v.image_id: v for v in session.scalars(
            select(table).where(table.run_id == run_id, table.image_id.in_(image_ids)))}
    claimed: dict[int, set[str]] = {}
    for image_id, engine, claim in session.execute(
            select(Source.image_id, Source.engine, Label.name).join(Label, Label.id == Source.label_id)
            .where(Source.image_id.in_([i for i, r in rows.items() if r.conflict == "labels"]))):
        # Every label a source claims for the image, with where the claim came from.
        claimed.setdefault(image_id, set()).add(f"{claim} ({engine})")
    carried: dict[int, set[str]] = {}
    for group, label_id in session.execute(
            select(Image.dup_group_id, Image.label_id).where(Image.dup_group_id.in_(
                {r.dup_group_id for r in rows.values() if r.conflict and r.conflict != "labels"}))):
        carried.setdefault(group, set()).add(names.get(label_id, "?"))
    tiles = []
    for image_id in image_ids:
        row = rows.get(image_id)
        if row is None:
            continue
        score, verdict = scores.get(image_id), verdicts.get(image_id)
        flag = ""
        if score is not None and score.label_issue:
            flag = f"label issue: {score.suggested}?"
        elif score is not None and score.outlier:
            flag = "outlier"
        elif verdict is not None:
            flag = (f"predicted {verdict.predicted} p={verdict.probability:.2f}, loss {verdict.loss:.2f}"
                    f" ({verdict.split})")
        claims = sorted(claimed.get(image_id, ()))
        if row.conflict and row.conflict != "labels":
            claims = [f"near-copies carry {', '.join(sorted(carried.get(row.dup_group_id, ())))}"]
        tiles.append({"id": image_id, "label": names.get(row.label_id), "label_id": row.label_id,
                      "status": str(row.status), "reviewed": image_id in reviewed, "conflict": row.conflict,
                      "flag": flag, "claims": claims,
                      "suggested": score.suggested if score is not None and score.label_issue else None})
    return tiles


def _page(request: Request, title: str, q: dict, sections: list[dict], total: int, reviewed: int,
          pages: int) -> Response:
    gallery: Gallery = request.app.state.gallery
    with gallery.catalog.session() as session:
        keys = _keys(session, gallery)
    return templates.TemplateResponse(request, "grid.html", {
        "title": title, "q": q, "sections": sections, "total": total, "reviewed": reviewed, "pages": pages, **keys})


def _keys(session, gallery: Gallery) -> dict:
    """What a page with the gallery's keys needs: relabel digits, label names for `r`, the CSRF secret and
    how often to follow the catalog."""
    return {"digits": relabel_digits(session), "labels": sorted(label_names(session).values()),
            "csrf": gallery.csrf, "live_ms": LIVE_MS}


def grid(request: Request) -> Response:
    """A label's (or every) image of one status, in one of the prompt's review orders, a page at a time."""
    gallery: Gallery = request.app.state.gallery
    try:
        q = _query(request)
        with gallery.catalog.session() as session:
            shown, total, reviewed = review_page(session, q["label"], q["status"], q["order"], q["run"], q["audit"],
                                                 q["page"], PAGE_SIZE)
            run_id = run_with_losses(session, q["run"]) if q["run"] else None
            audit_id = audit_with_scores(session, q["audit"]) if q["audit"] or q["order"] == "issues" else None
            tiles = _tiles(session, shown, run_id, audit_id, reviewed_ids(session, shown))
    except FastclassError as exc:
        return PlainTextResponse(f"Error: {exc}", status_code=400)
    title = f"{q['label'] or 'all labels'} · {q['status']} · order {q['order']}" + (
        f" · run {q['run']}" if q["run"] else "")
    return _page(request, title, q, [{"title": None, "tiles": tiles}], total, reviewed,
                 max(1, -(-total // PAGE_SIZE)))


def groups(request: Request) -> Response:
    """Duplicate groups side by side, keeper first (`?conflicts=1`: only groups that span labels)."""
    gallery: Gallery = request.app.state.gallery
    try:
        q = _query(request)
        with gallery.catalog.session() as session:
            found = duplicate_groups(session, q["label"], request.query_params.get("conflicts") == "1")
            shown = found[(q["page"] - 1) * 50:q["page"] * 50]
            reviewed = reviewed_ids(session, [i for g in found for i in g["images"]])
            sections = [{"title": f"group {g['group']}" + (" (label conflict)" if g["conflict"] else "")
                         + f": keeper {g['keeper']} first, {g['hash']}",
                         "tiles": _tiles(session, g["images"], None, None, reviewed)} for g in shown]
    except FastclassError as exc:
        return PlainTextResponse(f"Error: {exc}", status_code=400)
    total = sum(len(g["images"]) for g in found)
    return _page(request, f"{len(found)} duplicate group(s)", q, sections, total, len(reviewed),
                 max(1, -(-len(found) // 50)))


def snapshot_view(request: Request) -> Response:
    """A snapshot's images by label, train and valid side by side."""
    gallery: Gallery = request.app.state.gallery
    name = request.path_params["name"]
    try:
        q = _query(request)
        with gallery.catalog.session() as session:
            items = snapshot_items(session, name)
            labels = sorted({item.label for item in items})
            if q["label"]:
                labels = [label for label in labels if label == q["label"]]
            reviewed = reviewed_ids(session, [item.image_id for item in items])
            sections = []
            for label in labels:
                for side, is_valid in (("train", False), ("valid", True)):
                    ids = [item.image_id for item in items if item.label == label and item.is_valid == is_valid]
                    sections.append({"title": f"{label}: {side} ({len(ids)})",
                                     "tiles": _tiles(session, ids[:PAGE_SIZE], None, None, reviewed)})
    except FastclassError as exc:
        return PlainTextResponse(f"Error: {exc}", status_code=404)
    return _page(request, f"snapshot {name}", q, sections, len(items), len(reviewed), 1)


def image_view(request: Request) -> Response:
    """One image large, with its whole story (`fastclass image`), and the same keys as a grid."""
    from fastclass.curate.story import image_story

    gallery: Gallery = request.app.state.gallery
    image_id = int(request.path_params["image_id"])
    try:
        with gallery.catalog.session() as session:
            story = image_story(session, str(image_id), gallery.catalog.store)
            tile = _states(session, [image_id])[0]
            keys = _keys(session, gallery)
    except NotFoundError as exc:
        return PlainTextResponse(f"Error: {exc}", status_code=404)
    return templates.TemplateResponse(request, "image.html", {"s": story, "tile": tile, **keys})


def thumbnail(request: Request) -> Response:
    gallery: Gallery = request.app.state.gallery
    size = int(request.query_params.get("s", "256")) if request.query_params.get("s", "256").isdigit() else 256
    size = min(THUMB_SIZES, key=lambda s: abs(s - size))
    try:
        path, sha = gallery.thumbnail(int(request.path_params["image_id"]), size)
        # An image id always names the same bytes (the store is content-addressed): a thumbnail never changes.
        headers = {"Cache-Control": "private, max-age=31536000, immutable", "ETag": f'"{sha}-{size}"'}
        if request.headers.get("if-none-match") == headers["ETag"]:
            return Response(status_code=304, headers=headers)
        # A few kB: read whole here (this handler runs in a worker thread), not streamed chunk by chunk.
        data = path.read_bytes()
    except NotFoundError as exc:
        return PlainTextResponse(str(exc), status_code=404)
    except OSError as exc:
        return PlainTextResponse(f"no thumbnail: {exc.strerror or exc}", status_code=404)
    return Response(data, media_type="image/jpeg", headers=headers)


def original(request: Request) -> Response:
    gallery: Gallery = request.app.state.gallery
    with gallery.catalog.session() as session:
        image = session.get(Image, int(request.path_params["image_id"]))
        if image is None:
            return PlainTextResponse("no such image", status_code=404)
        path = gallery.catalog.store.path(image.store_path)
    if not Path(path).exists():
        return PlainTextResponse("the file is not in the store (pruned?)", status_code=404)
    return FileResponse(path, headers={"Cache-Control": "private, max-age=31536000, immutable"})


def _state(session, image_id: int) -> dict:
    return _states(session, [image_id])[0]


def _states(session, image_ids: list[int]) -> list[dict]:
    """Each image as it is now in the catalog (missing ones left out), in the order given."""
    names = label_names(session)
    reviewed = reviewed_ids(session, image_ids)
    rows = {r.id: r for r in session.execute(select(Image.id, Image.status, Image.label_id)
                                             .where(Image.id.in_(image_ids)).execution_options(populate_existing=True))}
    return [{"id": i, "status": str(rows[i].status), "label_id": rows[i].label_id,
             "label": names.get(rows[i].label_id), "reviewed": i in reviewed} for i in image_ids if i in rows]


def api_tiles(request: Request) -> Response:
    """?ids=1,2,3: those images' states now, so a page shows what other reviewers decided since it loaded."""
    gallery: Gallery = request.app.state.gallery
    try:
        ids = [int(i) for i in request.query_params.get("ids", "").split(",") if i]
    except ValueError:
        return JSONResponse({"error": "ids: image ids separated by commas"}, status_code=400)
    if len(ids) > LIVE_MAX_IDS:
        return JSONResponse({"error": f"at most {LIVE_MAX_IDS} ids per request"}, status_code=400)
    with gallery.catalog.session() as session:
        return JSONResponse({"tiles": _states(session, ids)})


async def api_decide(request: Request) -> Response:
    """{"images": [{"id", "status", "label_id"} as shown], "action", "label"}: all of them in one
    transaction, or none (409 with the image that changed and its state now)."""
    gallery: Gallery = request.app.state.gallery
    try:
        body = await request.json()
        shown = [(int(item["id"]), str(item["status"]), item.get("label_id")) for item in body["images"]]
        action, label = str(body["action"]), body.get("label")
    except (ValueError, KeyError, TypeError):
        return JSONResponse({"error": "expected {images: [{id, status, label_id}], action, label}"}, status_code=400)
    if not shown:
        return JSONResponse({"error": "no image chosen"}, status_code=400)
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(_decide, gallery, shown, action, label)


def _decide(gallery: Gallery, shown: list[tuple], action: str, label: str | None) -> Response:
    with gallery.catalog.session() as session:
        current = None
        try:
            decisions = []
            for image_id, status, label_id in shown:
                current = image_id
                decisions.append(decide(session, gallery.catalog.store, image_id, action, label, gallery.reviewer,
                                        commit=False, seen=(status, label_id)))
            session.commit()
        except NotFoundError as exc:
            session.rollback()
            return JSONResponse({"error": str(exc), "image": current}, status_code=404)
        except FastclassError as exc:
            session.rollback()
            return JSONResponse({"error": str(exc), "image": current, "state": _state(session, current)},
                                status_code=409)
        return JSONResponse({"decided": [{"review": d.review_id, **_state(session, d.image_id)} for d in decisions]})


async def api_undo(request: Request) -> Response:
    """{"reviews": [id, ...]}: undone newest first; stops at the first that cannot be undone."""
    gallery: Gallery = request.app.state.gallery
    try:
        reviews = [int(r) for r in (await request.json())["reviews"]]
    except (ValueError, KeyError, TypeError):
        return JSONResponse({"error": "expected {reviews: [id, ...]}"}, status_code=400)
    from starlette.concurrency import run_in_threadpool

    def work() -> Response:
        undone = []
        with gallery.catalog.session() as session:
            for review_id in sorted(reviews, reverse=True):
                try:
                    decision = undo(session, gallery.catalog.store, review_id, gallery.reviewer)
                except FastclassError as exc:
                    session.rollback()
                    return JSONResponse({"error": str(exc), "undone": undone}, status_code=409)
                undone.append(_state(session, decision.image_id))
        return JSONResponse({"undone": undone})

    return await run_in_threadpool(work)


def create_app(catalog: Catalog, reviewer: str, token: str | None = None) -> Starlette:
    """The gallery on an open catalog; `token` (for a non-loopback bind) is then required on every request."""
    app = Starlette(routes=[
        Route("/", index),
        Route("/grid", grid),
        Route("/groups", groups),
        Route("/snapshot/{name}", snapshot_view),
        Route("/image/{image_id:int}", image_view),
        Route("/image/{image_id:int}/file", original),
        Route("/thumb/{image_id:int}", thumbnail),
        Route("/api/tiles", api_tiles),
        Route("/api/decide", api_decide, methods=["POST"]),
        Route("/api/undo", api_undo, methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
        Route("/favicon.ico", lambda request: Response(status_code=204)),
    ], middleware=[Middleware(_Guard)])
    app.state.gallery = Gallery(catalog, reviewer, token)
    return app

