"""`fastclass verify`: a full decode of every pending image, precise reasons, and a prune that frees only rejects."""
from __future__ import annotations

import io
import json
import struct
import zlib

from PIL import Image

from tests.helpers import catalog_rows, image_bytes, run_cli, write


def png_with_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares a huge size (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda tag, data: struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b"")


def broken_crc_png() -> bytes:
    data = bytearray(image_bytes("PNG", (64, 48), seed=11))
    idat = data.index(b"IDAT")
    data[idat + 8] ^= 0xFF  # corrupt the compressed pixels; the chunk's CRC no longer matches
    return bytes(data)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def rotated_jpeg() -> bytes:
    img = Image.open(io.BytesIO(image_bytes("JPEG", (120, 60), seed=12)))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display: 120x60 shows as 60x120
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    return buf.getvalue()


def cases(root):
    jpeg = image_bytes("JPEG", (300, 200), seed=13)
    files = {
        "good.jpg": image_bytes("JPEG", (96, 72), seed=14),
        "cmyk.jpg": image_bytes("JPEG", (96, 72), seed=15, mode="CMYK"),
        "sixteen.png": _png16(),
        "gray.png": image_bytes("PNG", (96, 72), seed=16, mode="L"),
        "rotated.jpg": rotated_jpeg(),
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "crc.png": broken_crc_png(),
        "anim.gif": animated_gif(),
        "bomb.png": png_with_size(30000, 30000),
        "tiny.png": image_bytes("PNG", (8, 8), seed=17),
        "strip.png": image_bytes("PNG", (640, 40), seed=18),
        "vector.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        "zero.jpg": b"",
    }
    for name, data in files.items():
        write(root / "things" / name, data)
    return root


def _png16() -> bytes:
    buf = io.BytesIO()
    Image.new("I;16", (80, 60), 40000).save(buf, "PNG")
    return buf.getvalue()


def statuses(location: str) -> dict[str, tuple]:
    rows = catalog_rows(location, "SELECT s.uri, i.status, i.reason, i.width, i.height, i.mode "
                                 "FROM images i JOIN sources s ON s.image_id = i.id")
    return {uri.rsplit("/", 1)[1]: (status, reason, w, h, mode) for uri, status, reason, w, h, mode in rows}


def test_verify_sets_status_reason_and_true_size(initialized_catalog, tmp_path):
    imported = json.loads(run_cli(["import", str(cases(tmp_path / "in")), "--json"], initialized_catalog).stdout)
    assert imported["skipped"] == {"vector image (SVG) is not supported": 1, "empty file": 1}
    result = run_cli(["verify", "--json", "--workers", "2"], initialized_catalog)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["checked"] == 11 and summary["ok"] == 5
    assert summary["rejected"] == {"truncated image data": 1, "corrupt image data": 1, "animated": 1,
                                   "decompression bomb": 1, "too small": 1, "extreme aspect ratio": 1}
    got = statuses(initialized_catalog)
    assert got["good.jpg"] == ("ok", None, 96, 72, "RGB")
    assert got["cmyk.jpg"] == ("ok", None, 96, 72, "CMYK")
    assert got["sixteen.png"][:2] == ("ok", None) and got["sixteen.png"][4].startswith("I")
    assert got["gray.png"] == ("ok", None, 96, 72, "L")
    assert got["rotated.jpg"] == ("ok", None, 60, 120, "RGB")
    assert got["truncated.jpg"][:2] == ("rejected", "truncated image data")
    assert got["crc.png"][0] == "rejected" and got["crc.png"][1].startswith("corrupt image data")
    assert got["anim.gif"][:2] == ("rejected", "animated (3 frames)")
    assert got["bomb.png"][:2] == ("rejected", "decompression bomb (30000x30000 pixels is over the limit of 89478485)")
    assert got["tiny.png"][:2] == ("rejected", "too small (8x8 is under 32x32)")
    assert got["strip.png"][:2] == ("rejected", "extreme aspect ratio (640x40)")
    again = json.loads(run_cli(["verify", "--json"], initialized_catalog).stdout)
    assert again["checked"] == 0, "verified images are not checked twice without --recheck"


def test_rules_are_configurable_with_recheck(initialized_catalog, tmp_path):
    run_cli(["import", str(cases(tmp_path / "in"))], initialized_catalog)
    run_cli(["verify"], initialized_catalog)
    result = json.loads(run_cli(["verify", "--recheck", "--json", "--min-size", "4x4", "--animated", "first-frame",
                                 "--max-aspect", "25"], initialized_catalog).stdout)
    assert result["checked"] == 11 and result["ok"] == 8
    got = statuses(initialized_catalog)
    assert got["anim.gif"][0] == got["tiny.png"][0] == got["strip.png"][0] == "ok"


def test_prune_removes_only_rejected_files_and_every_row_keeps_its_file(initialized_catalog, tmp_path):
    run_cli(["import", str(cases(tmp_path / "in"))], initialized_catalog)
    result = run_cli(["verify", "--prune"], initialized_catalog)
    assert result.exit_code == 0
    assert result.stdout.splitlines()[-1] == "Pruned: removed 6 file(s) of deleted or rejected images from the store."
    store = tmp_path / "images"
    rows = catalog_rows(initialized_catalog, "SELECT status, reason, store_path FROM images")
    for status, reason, rel in rows:
        assert status in ("ok", "deleted")
        assert (store / rel).exists() == (status == "ok")
        assert (status == "deleted") == (reason is not None), "a pruned row keeps its reason"
    assert len([r for r in rows if r[0] == "deleted"]) == 6


def test_verify_errors(sqlite_catalog):
    assert run_cli(["verify", "--label", "nope"], sqlite_catalog).stderr == \
        "Error: no label 'nope' in the catalog (see `fastclass labels`)\n"
    assert run_cli(["verify", "--min-size", "big"], sqlite_catalog).stderr == \
        "Error: size 'big' is not WIDTHxHEIGHT, e.g. 100x100\n"
