"""Hostile input: pages, URLs and image bodies meant to exhaust the crawler, files meant to break the
decoders, names and rows meant to break the catalog. One bad item never stops a batch, loses data or
escapes its limits. Real servers on 127.0.0.1, real files, real subprocesses where time and memory count."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import catalog_rows, photo_like, run_cli
from tests.webserver import EngineSite, gzip_bomb

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def site():
    server = EngineSite()
    yield server
    server.close()


def cli_process(catalog: str, *args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run the CLI in a child process: (result, wall seconds, the child's peak memory in MB)."""
    probe = ("import resource, subprocess, sys, time\n"
             "t = time.monotonic()\n"
             "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
             "sys.stdout.write(r.stdout); sys.stderr.write(r.stderr)\n"
             "sys.stderr.write('\\nPROBE %f %d\\n' % (time.monotonic() - t, "
             "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
             "sys.exit(r.returncode)\n")
    result = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "fastclass", "--catalog", catalog,
                             *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    body, _, tail = result.stderr.rpartition("\nPROBE ")
    seconds, kib = tail.split()
    result.stderr = body
    return result, float(seconds), int(kib) / 1024


def test_result_pages_are_read_within_byte_decompressed_and_time_limits(sqlite_catalog, site):
    site.pages["good"] = f'<html><body><img src="{site.add_image("a.jpg", photo_like(1, (64, 64), "JPEG"))}"></body></html>'
    pages = [site.url(p) for p in ("/hostile/gzip-bomb-page", "/hostile/endless-page", "/hostile/drip-page\x1b]0;t\x07",
                                   "/page/good")]
    gzip_bomb()  # built before the clock starts
    args = ["crawl", "--label", "pages", "--timeout", "1", "--allow-private", "--json"]
    for page in pages:
        args += ["--url", page]
    result, seconds, peak_mb = cli_process(sqlite_catalog, *args)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["new_images"] == 1
    warnings = [line for line in result.stderr.splitlines() if line.startswith("greedy: skipping")]
    assert len(warnings) == 3, result.stderr
    assert "\x1b" not in result.stderr
    assert sum("larger than 10485760 bytes" in w for w in warnings) == 2, "\n".join(warnings)
    assert sum("download too slow" in w for w in warnings) == 1, warnings
    # Before: the 500 KB bomb inflated to gigabytes, the endless page grew without end, the drip page
    # ran for minutes. Now each stops at its limit: 10 MB, three times --timeout.
    assert seconds < 20, seconds
    assert peak_mb < 400, peak_mb


def test_image_downloads_stop_at_their_limits_and_bad_urls_fail_alone(sqlite_catalog, site):
    good = [site.add_image(f"{n}.jpg", photo_like(n, (64, 64), "JPEG")) for n in range(3)]
    gzip_bomb()
    site.results["*"] = good + ["http://[::1/x.jpg", "http://exa mple.com/\x1b]0;pwned\x07.jpg"] + [
        site.url(f"/hostile/{name}") for name in ("gzip-bomb", "endless", "drip-1", "drip-2", "drip-3")]
    result, seconds, peak_mb = cli_process(
        sqlite_catalog, "crawl", "kite", "--engine", "bing", "--engine-url", f"bing={site.base}",
        "--timeout", "1", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["status"] == "done" and report["new_images"] == 3
    assert report["rejected"] == {"larger than the byte cap": 2}, report
    assert report["failed"] == {"download too slow": 3, "not a well-formed http(s) URL": 1, "bad URL": 1}, report
    assert "\x1b" not in result.stdout + result.stderr
    assert seconds < 15, seconds  # the drips: three times --timeout each, in parallel
    assert peak_mb < 400, peak_mb


def test_urls_file_with_a_malformed_url_goes_on(sqlite_catalog, site, tmp_path):
    urls = tmp_path / "urls.txt"
    good = [site.add_image(f"{n}.jpg", photo_like(n, (64, 64), "JPEG")) for n in range(2)]
    urls.write_text("\n".join([good[0], "http://[::1/x", good[1]]))
    result = run_cli(["crawl", "--urls", str(urls), "--label", "listed", "--allow-private", "--json"],
                     sqlite_catalog)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["new_images"] == 2
    assert f"{urls}:2: not a well-formed http(s) URL: 'http://[::1/x'" in result.stderr


def test_private_loopback_and_link_local_targets_are_refused_unless_allowed(sqlite_catalog, site):
    other = EngineSite()
    try:
        inside = other.add_image("secret.jpg", photo_like(7, (64, 64), "JPEG"))
        site.redirect_to = inside
        site.results["kite"] = [site.add_image("public.jpg", photo_like(1, (64, 64), "JPEG")), inside,
                                inside.replace("127.0.0.1", "localhost"), "http://10.0.0.1/x.jpg",
                                "http://169.254.169.254/latest/meta-data/", "http://[::ffff:127.0.0.1]/x.jpg",
                                site.url("/hostile/redirect")]
        base = ["crawl", "kite", "--engine", "bing", "--engine-url", f"bing={site.base}", "--json"]
        report = json.loads(run_cli(base, sqlite_catalog).stdout)
        # The engine URL is an address the user named, so its own images are fetched; nothing else private.
        assert report["new_images"] == 1 and sum(report["failed"].values()) == 6, report
        assert other.hits["/img/secret.jpg"] == 0, "a refused target is never connected to"
        reasons = {url: reason for url, reason in catalog_rows(
            sqlite_catalog, "SELECT url, reason FROM fetched_urls WHERE outcome != 'ok'")}
        assert reasons["http://10.0.0.1/x.jpg"] == \
            "refused: 10.0.0.1 is a private address (10.0.0.1); pass --allow-private to fetch from it"
        assert reasons["http://169.254.169.254/latest/meta-data/"].startswith("refused: 169.254.169.254 is a link-local")
        assert reasons[inside.replace("127.0.0.1", "localhost")].startswith("refused: localhost is a loopback")
        assert "loopback" in reasons[site.url("/hostile/redirect")], "a redirect is checked where it leads"

        site.results["owl"] = [inside, site.url("/hostile/redirect")]
        allowed = run_cli(["crawl", "owl", "--engine", "bing", "--engine-url", f"bing={site.base}",
                           "--allow-private", "--json"], sqlite_catalog)
        assert json.loads(allowed.stdout)["new_images"] == 1 and other.hits["/img/secret.jpg"] == 2
    finally:
        other.close()


def test_ctrl_c_ends_a_crawl_of_dripping_downloads_within_moments(sqlite_catalog, site):
    site.results["*"] = [site.url(f"/hostile/drip-{n}") for n in range(8)]
    process = subprocess.Popen(
        [sys.executable, "-m", "fastclass", "--catalog", sqlite_catalog, "crawl", "slow", "--engine", "bing",
         "--engine-url", f"bing={site.base}", "--timeout", "60"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while sum(site.hits[f"/hostile/drip-{n}"] for n in range(8)) < 8 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, err = process.communicate(timeout=30)
    waited = time.monotonic() - sent
    assert process.returncode == 130, err
    assert "interrupted" in err
    assert waited < 3, f"Ctrl-C took {waited:.1f} s"
    assert catalog_rows(sqlite_catalog, "SELECT status FROM crawl_jobs") == [("interrupted",)]


# -- files ------------------------------------------------------------------------------------------

def tiff_second_page_without_dimensions() -> bytes:
    """A two-page TIFF whose second page has no width or height: reading its page count raises
    TypeError("Missing dimensions") in Pillow (like the fuzz files in Pillow's own test corpus)."""
    import struct

    def ifd(entries: list[tuple[int, int, int, int]], next_offset: int) -> bytes:
        body = struct.pack("<H", len(entries))
        for tag, kind, count, value in entries:
            body += struct.pack("<HHII", tag, kind, count, value)
        return body + struct.pack("<I", next_offset)

    pixels_at = 8
    pixels = bytes(range(256)) * 16  # 64x64, 8-bit grey
    first_at = pixels_at + len(pixels)
    first = [(256, 3, 1, 64), (257, 3, 1, 64), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
             (273, 4, 1, pixels_at), (277, 3, 1, 1), (278, 3, 1, 64), (279, 4, 1, len(pixels))]
    second_at = first_at + 2 + 12 * len(first) + 4
    return (b"II*\x00" + struct.pack("<I", first_at) + pixels + ifd(first, second_at)
            + ifd([(259, 3, 1, 1), (262, 3, 1, 1)], 0))


def psd_with_negative_layer() -> bytes:
    """A PSD whose one layer's box ends before it starts: Pillow raises ValueError("negative tile size")
    when its layers are counted."""
    import struct

    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 64, 64, 8, 3)
    layer = struct.pack(">iiii", 0, 10, 10, 0) + struct.pack(">HHI", 1, 0, 0) + b"8BIMnorm" + bytes(4) \
        + struct.pack(">I", 0)
    info = struct.pack(">h", 1) + layer
    layers = struct.pack(">I", len(info)) + info
    image = struct.pack(">H", 0) + bytes(64 * 64 * 3)
    return header + struct.pack(">I", 0) + struct.pack(">I", 0) + struct.pack(">I", len(layers)) + layers + image


def test_fuzzed_files_hangs_crashes_and_memory_hogs_are_rejected_alone(sqlite_catalog, tmp_path, monkeypatch):
    from PIL import Image

    root = tmp_path / "in" / "things"
    files = {"good-0.png": photo_like(0), "good-1.png": photo_like(1), "no-dimensions.tif": tiff_second_page_without_dimensions(),
             "negative-tile.psd": psd_with_negative_layer(), "crash.png": photo_like(2), "hang.png": photo_like(3)}
    big = Image.new("RGBA", (6000, 6000))  # 144 MB decoded, 140 KB on disk
    big.putpixel((5, 5), (1, 2, 3, 4))
    big.save(tmp_path / "big.png")
    files["hog.png"] = (tmp_path / "big.png").read_bytes()
    root.mkdir(parents=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    imported = run_cli(["import", str(tmp_path / "in"), "--json"], sqlite_catalog)
    assert json.loads(imported.stdout)["new_images"] == 7, imported.output

    # The test hooks act on a task's key, which for verify is the stored file (named by its sha256).
    monkeypatch.setenv("FASTCLASS_TEST_CRASH_ON", hashlib.sha256(files["crash.png"]).hexdigest())
    monkeypatch.setenv("FASTCLASS_TEST_HANG_ON", hashlib.sha256(files["hang.png"]).hexdigest())
    result = run_cli(["verify", "--file-timeout", "2", "--file-memory", "64", "--workers", "2", "--json"],
                     sqlite_catalog)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["checked"] == 7 and report["ok"] == 2, report
    reasons = dict(catalog_rows(sqlite_catalog, "SELECT s.uri, i.reason FROM images i "
                                                "JOIN sources s ON s.image_id = i.id WHERE i.status = 'rejected'"))
    by_name = {Path(uri).name: reason for uri, reason in reasons.items()}
    assert by_name == {
        "no-dimensions.tif": "cannot decode (TypeError: Missing dimensions)",
        "negative-tile.psd": "cannot decode (ValueError: negative tile size)",
        "crash.png": "the decoder crashed (exit code 70)",
        "hang.png": "decoding took longer than 2 s (the per-file limit)",
        "hog.png": "decoding needs more memory than the per-file limit",
    }, by_name
    assert "Missing dimensions" not in result.stderr


def test_import_survives_a_crashing_decoder(sqlite_catalog, tmp_path, monkeypatch):
    root = tmp_path / "in" / "things"
    root.mkdir(parents=True)
    for n in range(12):
        (root / f"{n:02d}.png").write_bytes(photo_like(n))
    monkeypatch.setenv("FASTCLASS_TEST_CRASH_ON", "05.png")
    result = run_cli(["import", str(tmp_path / "in"), "--workers", "2", "--json"], sqlite_catalog)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["new_images"] == 11 and report["skipped"] == {"the decoder crashed (exit code 70)": 1}
    assert "05.png: the decoder crashed" in result.stderr


def test_names_that_are_not_utf8_are_imported_or_skipped_with_a_reason(sqlite_catalog, tmp_path):
    root = tmp_path / "in"
    (root / "cats").mkdir(parents=True)
    (root / "cats" / os.fsdecode(b"caf\xe9.png")).write_bytes(photo_like(1))
    (root / "cats" / "plain.png").write_bytes(photo_like(2))
    (root / os.fsdecode(b"chi\xe9ns")).mkdir()
    (root / os.fsdecode(b"chi\xe9ns") / "dog.png").write_bytes(photo_like(3))
    result = run_cli(["import", str(root), "--json"], sqlite_catalog)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["new_images"] == 2
    assert report["skipped"] == {"label folder name is not valid UTF-8 (rename the folder)": 1}
    uris = [uri for (uri,) in catalog_rows(sqlite_catalog, "SELECT uri FROM sources ORDER BY uri")]
    assert uris == [str(root / "cats" / "caf\\xe9.png"), str(root / "cats" / "plain.png")]


def test_a_symlink_dag_is_walked_once_per_folder(sqlite_catalog, tmp_path):
    root = tmp_path / "in" / "things"
    levels = [tmp_path / f"level{n}" for n in range(21)]
    for level in levels:
        level.mkdir()
    (levels[-1] / "only.png").write_bytes(photo_like(1))
    for here, below in zip(levels, levels[1:]):
        (here / "a").symlink_to(below)
        (here / "b").symlink_to(below)
    root.parent.mkdir()
    root.symlink_to(levels[0])
    # 2**20 paths reach the one image; each folder is walked once.
    result = run_cli(["import", str(tmp_path / "in"), "--json"], sqlite_catalog)
    report = json.loads(result.stdout)
    assert report["new_images"] == 1 and report["new_sources"] == 1
    assert report["skipped"] == {"folder reached again by a link": 20}


# -- CSV files ---------------------------------------------------------------------------------------

def test_class_csv_is_parsed_strictly_with_line_numbers_and_known_encodings(sqlite_catalog, site, tmp_path):
    from fastclass.crawl.options import read_class_csv

    table = tmp_path / "classes.csv"
    table.write_text('searchterm,exclude\nkestrel,\n"barn owl,\nheron,"grey\nlapwing,\n'
                     f'{"x" * 5000},\nbitt\x1bern,\n', encoding="utf-8")
    rows, errors = read_class_csv(table)
    # Before: the open quote on line 3 swallowed the rest of the file into one class, silently.
    assert [row.label for row in rows] == ["kestrel", "lapwing"]
    assert errors == [f"{table}:3: a quote is not closed", f"{table}:4: a quote is not closed",
                      f"{table}:6: the line is longer than 4000 characters",
                      f"{table}:7: a control or invisible character in the row"]

    table.write_bytes("searchterm,exclude\ncafé,\n".encode("utf-16"))
    assert [row.label for row in read_class_csv(table)[0]] == ["café"]
    table.write_bytes("searchterm,exclude\ncafé,\n".encode("latin-1"))
    result = run_cli(["crawl", "--from", str(table), "--engine", "bing", "--engine-url", f"bing={site.base}"],
                     sqlite_catalog)
    assert result.exit_code == 1
    assert result.stderr == f"Error: {table}:2: not UTF-8 (byte 0xE9); save the file as UTF-8\n"
    table.write_bytes("searchterm,exclude\ncafé,\n".encode("utf-16-le"))
    assert "looks like UTF-16 without a byte-order mark" in run_cli(
        ["crawl", "--from", str(table), "--engine", "bing"], sqlite_catalog).stderr
    assert catalog_rows(sqlite_catalog, "SELECT count(*) FROM crawl_jobs") == [(0,)]


def test_decisions_csv_reports_a_bad_row_and_applies_the_rest(sqlite_catalog, tmp_path):
    (tmp_path / "in" / "cats").mkdir(parents=True)
    for n in range(3):
        (tmp_path / "in" / "cats" / f"{n}.png").write_bytes(photo_like(n))
    run_cli(["import", str(tmp_path / "in")], sqlite_catalog)
    decisions = tmp_path / "decisions.csv"
    decisions.write_text('image,action,label\n1,delete\n2,"delete\n3,delete\n')
    result = run_cli(["clean", "--apply", str(decisions), "--json"], sqlite_catalog)
    assert json.loads(result.stdout) == {"applied": 2, "errors": [f"{decisions}:3: a quote is not closed"]}
    assert catalog_rows(sqlite_catalog, "SELECT id, status FROM images ORDER BY id") == \
        [(1, "deleted"), (2, "pending"), (3, "deleted")]


# -- disks and stores --------------------------------------------------------------------------------

FULL_DISK_SCRIPT = r'''
set -e
mount -t tmpfs -o size=3m tmpfs "$DISK"
"$PY" -m fastclass --catalog "$DISK/catalog.db" init > /dev/null
head -c 300000 /dev/zero > "$DISK/ballast"
set +e
"$PY" -m fastclass --catalog "$DISK/catalog.db" import "$SRC" --json > "$OUT/stdout" 2> "$OUT/stderr"
echo $? > "$OUT/rc"
# The user frees some space; the next command clears whatever the failed import could not.
rm "$DISK/ballast"
"$PY" -m fastclass --catalog "$DISK/catalog.db" stats > /dev/null 2> "$OUT/stats-stderr"
echo $? > "$OUT/stats-rc"
"$PY" - > "$OUT/state.json" <<'CHECK'
import json, os, sqlite3
disk = os.environ["DISK"]
db = sqlite3.connect(f"file:{disk}/catalog.db?immutable=1", uri=True)
rows = {p for (p,) in db.execute("SELECT store_path FROM images")}
files, temps = set(), []
for folder, _, names in os.walk(f"{disk}/images"):
    for name in names:
        rel = os.path.relpath(os.path.join(folder, name), f"{disk}/images")
        (temps.append(rel) if rel.startswith(".tmp") else files.add(rel))
print(json.dumps({"rows": len(rows), "files": len(files), "orphans": sorted(files - rows),
                  "missing": sorted(rows - files), "temps": temps}))
CHECK
'''


def test_a_full_disk_is_reported_as_such_and_leaves_no_orphans(tmp_path):
    """A real full disk: a 3 MB tmpfs in a private mount namespace holds the catalog and the store."""
    source = tmp_path / "src" / "things"
    source.mkdir(parents=True)
    for n in range(400):
        (source / f"{n:03d}.png").write_bytes(photo_like(n, (96, 96)))
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    out.mkdir()
    env = {**os.environ, "DISK": str(disk), "OUT": str(out), "SRC": str(source.parent), "PY": sys.executable}
    try:
        done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", FULL_DISK_SCRIPT],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        pytest.skip("unshare is not installed")
    if not (out / "rc").exists():
        pytest.skip(f"cannot mount a small tmpfs in a user namespace here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr
    stderr = (out / "stderr").read_text()
    assert (out / "rc").read_text().strip() == "1", stderr
    assert "the disk is full" in stderr and "unexpected" not in stderr, stderr
    assert (out / "stats-rc").read_text().strip() == "0", (out / "stats-stderr").read_text()
    state = json.loads((out / "state.json").read_text())
    assert state["orphans"] == [] and state["missing"] == [] and state["temps"] == [], state


def test_a_killed_export_leaves_nothing_the_next_export_does_not_sweep(sqlite_catalog, tmp_path):
    (tmp_path / "in" / "cats").mkdir(parents=True)
    (tmp_path / "in" / "dogs").mkdir(parents=True)
    for n in range(4):
        (tmp_path / "in" / ("cats" if n % 2 else "dogs") / f"{n}.png").write_bytes(photo_like(n))
    for args in (["import", str(tmp_path / "in")], ["verify"], ["split"], ["snapshot", "create", "v1"]):
        assert run_cli(args, sqlite_catalog).exit_code == 0
    out = tmp_path / "exports"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = out / f".v1.partial-{dead.pid}"  # what kill -9 during an export leaves
    (leftover / "train" / "cats").mkdir(parents=True)
    (leftover / "train" / "cats" / "x.png").write_bytes(b"half")
    running = out / f".other.partial-{os.getpid()}"  # an export still running in another process
    running.mkdir()
    assert run_cli(["snapshot", "export", "v1", str(out / "v1")], sqlite_catalog).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == [running.name, "v1"]


def test_predict_takes_a_run_id_from_the_catalog_never_a_folder_named_like_one(sqlite_catalog, tmp_path, monkeypatch):
    trap = tmp_path / "work" / "1"
    trap.mkdir(parents=True)
    (trap / "export.pkl").write_bytes(b"cos\nsystem\n(S'touch pwned'\ntR.")  # a pickle that runs a command
    (tmp_path / "work" / "x.png").write_bytes(photo_like(1))
    monkeypatch.chdir(tmp_path / "work")
    result = run_cli(["predict", "1", "x.png"], sqlite_catalog)
    assert result.exit_code == 1 and result.stderr == "Error: no training run '1' in the catalog (see `fastclass runs`)\n"
    assert not (tmp_path / "work" / "pwned").exists()


def test_numbers_and_labels_that_would_break_the_catalog_are_refused_clearly(sqlite_catalog, tmp_path):
    huge = str(2**64)
    assert "is not in the range" in run_cli(["split", "--seed", huge], sqlite_catalog).stderr
    assert run_cli(["image", huge], sqlite_catalog).stderr == f"Error: no image with id {huge} in the catalog\n"
    assert run_cli(["runs", "show", huge], sqlite_catalog).stderr.startswith("Error: no training run")
    assert "is not in the range" in run_cli(["jobs", "--limit", huge], sqlite_catalog).stderr
    nan = run_cli(["verify", "--max-aspect", "nan"], sqlite_catalog)
    assert nan.exit_code == 2 and "'nan' is not a finite number" in nan.stderr
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(photo_like(1))
    for label, why in (("ab\u202ecd", "U+202E"), ("a\u200bb", "U+200B"), ("\U0001f600" * 70, "255 bytes")):
        result = run_cli(["import", str(tmp_path / "in"), "--label", label], sqlite_catalog)
        assert result.exit_code == 1 and why in result.stderr and "\u202e" not in result.stderr, result.stderr
    assert catalog_rows(sqlite_catalog, "SELECT count(*) FROM labels") == [(0,)]
