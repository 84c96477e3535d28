"""`fastclass serve`: the real app under uvicorn on 127.0.0.1, driven by a real headless Chromium (Debian's
`chromium`, through Playwright) and by plain HTTP for the security rules."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from contextlib import contextmanager

import pytest

from fastclass.catalog import init_catalog, open_catalog
from tests.helpers import add_images, catalog_rows, digit_images, run_cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DIGITS = {"zero": 0, "one": 1, "seven": 7}


def digits_catalog(location: str, tmp_path) -> str:
    """Six verified digits per label in a new catalog at `location`, its store in tmp_path."""
    init_catalog(location, str(tmp_path / "images"))
    opened = open_catalog(location)
    try:
        add_images(opened, tmp_path / "in", digit_images(DIGITS, 6))
    finally:
        opened.close()
    assert run_cli(["verify"], location).exit_code == 0
    return location


@pytest.fixture
def catalog(tmp_path) -> str:
    return digits_catalog(str(tmp_path / "catalog.db"), tmp_path)


@pytest.fixture
def pg_catalog(pg_database, tmp_path) -> str:
    return digits_catalog(pg_database, tmp_path)


@contextmanager
def serving(location: str, *extra: str, reviewer: str = "browser"):
    proc = subprocess.Popen([sys.executable, "-m", "fastclass", "--catalog", location, "serve", "--port", "0",
                             "--no-open", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "FASTCLASS_REVIEWER": reviewer})
    try:
        line = proc.stdout.readline()
        found = re.search(r"at (http://127\.0\.0\.1:\d+/\S*) \(Ctrl-C stops\)", line)
        assert found, (line, proc.stderr.read() if proc.poll() is not None else "")
        proc.url = found.group(1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def http(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def statuses(location: str) -> dict[int, tuple[str, str]]:
    return {i: (s, l) for i, s, l in catalog_rows(
        location, "SELECT i.id, i.status, l.name FROM images i JOIN labels l ON l.id = i.label_id")}


@pytest.fixture
def browser():
    if CHROMIUM is None:
        pytest.skip("no Chromium here: `apt-get install chromium` (.ci/run installs it)")
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


def open_grid(browser, url: str, label: str):
    page = browser.new_context().new_page()
    page.goto(f"{url}grid?label={label}")
    page.wait_for_function("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    return page


def test_keys_and_a_bulk_selection_change_exactly_the_rows_they_should(catalog, browser):
    before = statuses(catalog)
    zero = sorted(i for i, (_, label) in before.items() if label == "zero")
    with serving(catalog) as server:
        page = open_grid(browser, server.url, "zero")
        widths = page.eval_on_selector_all(".tile img", "imgs => imgs.map(i => i.naturalWidth)")
        assert len(widths) == len(zero) and all(w > 0 for w in widths)
        page.keyboard.press("d")  # the first image: deleted; the cursor moves on
        page.wait_for_selector(f'.tile[data-id="{zero[0]}"][data-status="deleted"]')
        two = json.loads(page.get_attribute("#grid", "data-digits"))["2"]
        page.keyboard.press("2")  # the second: relabelled to the label with digit 2
        page.wait_for_selector(f'.tile[data-id="{zero[1]}"] .label:text-is("{two}")', timeout=5000)
        page.keyboard.press("u")  # undone: zero again
        page.wait_for_selector(f'.tile[data-id="{zero[1]}"] .label:text-is("zero")', timeout=5000)
        for _ in range(2):
            page.keyboard.press("Shift+ArrowRight")  # from the third image: three selected
        assert page.eval_on_selector_all(".tile.selected", "t => t.map(e => Number(e.dataset.id))") == zero[2:5]
        page.keyboard.press("d")
        page.wait_for_selector(f'.tile[data-id="{zero[4]}"][data-status="deleted"]')
        assert page.inner_text("#counts") == f"4 reviewed / {len(zero) - 4} remaining"
    after = statuses(catalog)
    changed = {i for i in after if after[i] != before[i]}
    assert changed == {zero[0], zero[2], zero[3], zero[4]}
    assert all(after[i] == ("deleted", "zero") for i in changed)
    reviews = json.loads(run_cli(["reviews", "--json"], catalog).stdout)
    assert [(r["image"], r["action"], r["reviewer"]) for r in reversed(reviews)] == [
        (zero[0], "delete", "browser"), (zero[1], "relabel", "browser"), (zero[1], "undo", "browser"),
        (zero[2], "delete", "browser"), (zero[3], "delete", "browser"), (zero[4], "delete", "browser")]
    zero_stats = json.loads(run_cli(["stats", "--json"], catalog).stdout)["labels"]["zero"]
    assert (zero_stats["ok"], zero_stats["deleted"]) == (len(zero) - 4, 4)



def test_enter_opens_the_image_with_its_story_and_the_same_keys_decide_there(catalog, browser):
    zero = sorted(i for i, (_, label) in statuses(catalog).items() if label == "zero")
    sha, uri = catalog_rows(catalog, f"SELECT i.sha256, s.uri FROM images i JOIN sources s ON s.image_id = i.id "
                                     f"WHERE i.id = {zero[1]}")[0]
    with serving(catalog) as server:
        page = open_grid(browser, server.url, "zero")
        page.keyboard.press("ArrowRight")
        page.keyboard.press("Enter")
        page.wait_for_url(f"**/image/{zero[1]}")
        page.wait_for_function("document.querySelector('img.large').naturalWidth > 0")
        story = page.inner_text("main")
        assert sha in story and uri in story and "dhash" in story and "none" in story.split("Reviews")[1]
        page.keyboard.press("d")
        page.wait_for_selector(f'.tile[data-id="{zero[1]}"][data-status="deleted"]')
        page.reload()
        assert "browser: delete (ok zero" in page.inner_text("main")
    assert statuses(catalog)[zero[1]] == ("deleted", "zero")

def test_two_reviewers_on_one_image_one_wins_the_other_is_told(catalog, browser):
    zero = sorted(i for i, (_, label) in statuses(catalog).items() if label == "zero")
    with serving(catalog) as server:
        first, second = open_grid(browser, server.url, "zero"), open_grid(browser, server.url, "zero")
        first.keyboard.press("d")
        first.wait_for_selector(f'.tile[data-id="{zero[0]}"][data-status="deleted"]')
        second.keyboard.press("k")  # shown as ok, deleted since: refused, and the tile shows the truth
        second.wait_for_selector(f'.tile[data-id="{zero[0]}"][data-status="deleted"]')
        assert "changed" in second.inner_text("#message")
    assert [(r["image"], r["action"]) for r in json.loads(run_cli(["reviews", "--json"], catalog).stdout)] == [
        (zero[0], "delete")]



def test_two_reviewers_on_one_postgresql_catalog_never_lose_each_others_decisions(pg_catalog, browser):
    """Two reviewers, each with their own `serve` on the same PostgreSQL catalog."""
    zero = sorted(i for i, (_, label) in statuses(pg_catalog).items() if label == "zero")
    with serving(pg_catalog, reviewer="alice") as one, serving(pg_catalog, reviewer="bob") as other:
        alice, bob = open_grid(browser, one.url, "zero"), open_grid(browser, other.url, "zero")
        two = json.loads(bob.get_attribute("#grid", "data-digits"))["2"]
        alice.keyboard.press("d")
        alice.wait_for_selector(f'.tile[data-id="{zero[0]}"][data-status="deleted"]')
        bob.keyboard.press("k")  # bob's page showed it ok: refused, and his tile shows alice's decision
        bob.wait_for_selector(f'.tile[data-id="{zero[0]}"][data-status="deleted"]')
        assert "changed" in bob.inner_text("#message")
        bob.keyboard.press("ArrowRight")
        bob.keyboard.press("2")
        bob.wait_for_selector(f'.tile[data-id="{zero[1]}"] .label:text-is("{two}")')
        for _ in range(2):
            alice.keyboard.press("Shift+ArrowRight")  # zero[1..3] selected, but zero[1] was relabelled since
        alice.keyboard.press("d")
        alice.wait_for_selector(f'.tile[data-id="{zero[1]}"] .label:text-is("{two}")')
        assert "changed" in alice.inner_text("#message")
        assert all(statuses(pg_catalog)[i] == ("ok", "zero") for i in zero[2:4]), "all of a bulk action or none"
        # Without reloading, each page follows the other's decisions (bob's cursor moved on to zero[2]).
        bob.keyboard.press("d")
        bob.wait_for_selector(f'.tile[data-id="{zero[2]}"][data-status="deleted"]')
        alice.wait_for_selector(f'.tile.live[data-id="{zero[2]}"][data-status="deleted"]', timeout=10000)
    reviews = json.loads(run_cli(["reviews", "--json"], pg_catalog).stdout)
    assert sorted((r["image"], r["action"], r["reviewer"]) for r in reviews) == [
        (zero[0], "delete", "alice"), (zero[1], "relabel", "bob"), (zero[2], "delete", "bob")]
    assert [statuses(pg_catalog)[i] for i in zero[:4]] == [("deleted", "zero"), ("ok", two), ("deleted", "zero"),
                                                            ("ok", "zero")]

def test_a_decision_survives_the_server_killed_right_after_it(catalog, browser):
    zero = sorted(i for i, (_, label) in statuses(catalog).items() if label == "zero")
    with serving(catalog) as server:
        page = open_grid(browser, server.url, "zero")
        page.keyboard.press("d")
        page.wait_for_selector(f'.tile[data-id="{zero[0]}"][data-status="deleted"]')
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
    assert statuses(catalog)[zero[0]] == ("deleted", "zero")


def test_a_token_is_needed_when_asked_and_cross_site_posts_are_refused(catalog):
    image, label_id = catalog_rows(catalog, "SELECT id, label_id FROM images ORDER BY id LIMIT 1")[0]
    with serving(catalog, "--token") as server:
        base, token = server.url.split("?token=")
        assert http(base)[0] == 403
        assert http(f"{base}grid?token=wrong")[0] == 403
        status, page = http(f"{base}grid?label=zero&token={token}")
        assert status == 200 and 'name="csrf"' in page
        csrf = re.search(r'name="csrf" content="([^"]+)"', page).group(1)
        body = json.dumps({"images": [{"id": image, "status": "ok", "label_id": label_id}], "action": "delete"}).encode()
        headers = {"content-type": "application/json", "x-fastclass-csrf": csrf}
        # A form on another site can send neither the header nor a matching Origin.
        assert http(f"{base}api/decide?token={token}", body, {"content-type": "application/json"})[0] == 403
        assert http(f"{base}api/decide?token={token}", body, {**headers, "origin": "http://evil.example"})[0] == 403
        assert http(f"{base}api/decide", body, headers)[0] == 403, "the token too"
        assert statuses(catalog)[image][0] == "ok"
        status, answer = http(f"{base}api/decide?token={token}", body, {**headers, "origin": base.rstrip("/")})
        assert status == 200 and json.loads(answer)["decided"][0]["status"] == "deleted"
    with serving(catalog) as server:
        assert http(server.url)[0] == 200, "on loopback, no token unless --token"
        server.send_signal(signal.SIGINT)  # Ctrl-C: the normal way to stop a server
        out, err = server.communicate(timeout=20)
        assert (server.returncode, out, err) == (0, "Stopped; every decision was committed when it was made.\n", "")


def test_group_and_snapshot_views_show_their_sections(catalog, tmp_path):
    from tests.helpers import photo_like, write

    write(tmp_path / "more" / "zero" / "big.png", photo_like(3, (96, 96)))
    write(tmp_path / "more" / "zero" / "small.png", photo_like(3, (64, 64)))
    # The same bytes filed under two labels: a label conflict, each claim with its source.
    for label in ("zero", "seven"):
        write(tmp_path / "claims" / label / "claimed.png", photo_like(5, (80, 80)))
    for args in (["import", str(tmp_path / "more")], ["verify"], ["dedup"], ["split"], ["snapshot", "create", "v1"],
                 ["import", str(tmp_path / "claims")]):
        assert run_cli(args, catalog).exit_code == 0, args
    group, keeper = catalog_rows(catalog, "SELECT id, keeper_id FROM duplicate_groups")[0]
    members = [i for (i,) in catalog_rows(catalog, f"SELECT id FROM images WHERE dup_group_id = {group}")]
    with serving(catalog) as server:
        status, page = http(f"{server.url}groups")
        assert status == 200 and f"group {group}: keeper {keeper} first" in page
        assert re.findall(r'data-id="(\d+)"', page) == [str(keeper)] + [str(i) for i in members if i != keeper]
        status, page = http(f"{server.url}snapshot/v1")
        sections = re.findall(r'<h2 class="section">([^<]+)</h2>', page)
        assert status == 200 and [s.split(" (")[0] for s in sections] == [
            f"{label}: {side}" for label in sorted(DIGITS) for side in ("train", "valid")]
        held = catalog_rows(catalog, "SELECT count(*) FROM snapshot_items")[0][0]
        assert len(re.findall(r'class="tile', page)) == held
        status, page = http(f"{server.url}")
        assert status == 200 and 'href="/snapshot/v1"' in page and 'href="/groups"' in page
        assert http(f"{server.url}snapshot/nope")[0] == 404
        thumb = f"{server.url}thumb/{keeper}?s=256"
        request = urllib.request.Request(thumb)
        with urllib.request.urlopen(request, timeout=10) as response:
            etag, cache = response.headers["ETag"], response.headers["Cache-Control"]
            assert response.headers["Content-Type"] == "image/jpeg" and len(response.read()) > 100
        assert "immutable" in cache and etag
        assert http(thumb, headers={"If-None-Match": etag})[0] == 304
        assert http(f"{server.url}thumb/999999")[0] == 404
        status, page = http(f"{server.url}grid?status=conflict")
        assert status == 200 and len(re.findall(r'class="tile', page)) == 1
        assert re.search(r"claims: seven \(\w+\), zero \(\w+\)", page), page
