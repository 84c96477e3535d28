"""Ingest: the real format from the bytes, hashes, one image per content with one source per provenance."""
from __future__ import annotations

import io
import os
import random
import threading

import imagehash
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

from db.models import Image as ImageRow
from db.models import ImageHash, Source
from fastclass.ingest.analyze import NotAnImage, analyze_bytes, read_capped
from fastclass.ingest.hashes import HASH_KINDS, to_unsigned64
from fastclass.ingest.record import SourceInfo, ingest_bytes
from fastclass.sample import jpeg_bytes, load_photo, random_crop
from tests.helpers import image_bytes


@pytest.mark.parametrize("fmt, expected", [
    ("JPEG", "JPEG"), ("PNG", "PNG"), ("WEBP", "WEBP"), ("GIF", "GIF"), ("BMP", "BMP"), ("TIFF", "TIFF"),
])
def test_format_read_from_bytes_with_size_mode_and_hashes(fmt, expected):
    facts = analyze_bytes(image_bytes(fmt, (120, 80)))
    assert (facts.format, facts.width, facts.height) == (expected, 120, 80)
    assert facts.decode_error is None
    assert set(facts.hashes) == set(HASH_KINDS)
    assert all(-(1 << 63) <= v < (1 << 63) for v in facts.hashes.values())


def test_hashes_survive_recompression_and_resizing_but_differ_between_images():
    rng = random.Random(5)
    photo = load_photo("china.jpg")
    img, other = random_crop(photo, (640, 480), rng), random_crop(photo, (640, 480), rng)
    base = analyze_bytes(jpeg_bytes(img, 92)).hashes["phash"]
    near = analyze_bytes(jpeg_bytes(img.resize((320, 240)), 60)).hashes["phash"]
    far = analyze_bytes(jpeg_bytes(other)).hashes["phash"]
    distance = lambda a, b: bin(to_unsigned64(a) ^ to_unsigned64(b)).count("1")
    assert distance(base, near) <= 4
    assert distance(base, far) > 16


def _as_ingest_decodes(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.draft("L", (32, 32))
    return img.convert("L")


def test_hashes_are_imagehashs_of_the_image_as_ingest_decodes_it():
    """phash and dhash bit for bit; phash_flip is imagehash's phash of the mirrored image."""
    rng = random.Random(11)
    photos = [load_photo("china.jpg"), load_photo("flower.jpg")]
    samples = [jpeg_bytes(random_crop(rng.choice(photos), (rng.randint(40, 900), rng.randint(40, 700)), rng))
               for _ in range(60)]
    for seed in range(20):  # noise at odd sizes, as PNG (no reduced decode)
        shape = (rng.randint(9, 150), rng.randint(9, 150))
        pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
        samples.append(_png(Image.fromarray(pixels)))
    for data in samples:
        gray = _as_ingest_decodes(data)
        ours = {kind: to_unsigned64(value) for kind, value in analyze_bytes(data).hashes.items()}
        assert ours == {
            "phash": int(str(imagehash.phash(gray)), 16),
            "dhash": int(str(imagehash.dhash(gray)), 16),
            "phash_flip": int(str(imagehash.phash(gray.transpose(Image.Transpose.FLIP_LEFT_RIGHT))), 16),
        }


def _png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def test_read_capped_reads_whole_files_up_to_the_cap(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 1000)
    assert read_capped(path, 1000) == b"x" * 1000
    with pytest.raises(NotAnImage, match="^file is over the size limit of 999 bytes$"):
        read_capped(path, 999)


def test_read_capped_reads_a_pipe_whose_size_is_unknown(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_bytes, args=(b"y" * 70_000,))
    writer.start()
    assert read_capped(fifo, 100_000) == b"y" * 70_000
    writer.join()
    writer = threading.Thread(target=lambda: _write_ignoring_broken_pipe(fifo, b"y" * 70_000))
    writer.start()
    with pytest.raises(NotAnImage, match="over the size limit of 50000 bytes"):
        read_capped(fifo, 50_000)
    writer.join()


def _write_ignoring_broken_pipe(path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except BrokenPipeError:
        pass


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"<!DOCTYPE html><html><body>Not found</body></html>", "not an image (HTML/XML text)"),
    (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "vector image (SVG) is not supported"),
    (b"just some notes\n", "not an image (UnidentifiedImageError)"),
])
def test_non_images_are_refused_with_a_reason(data, reason):
    with pytest.raises(NotAnImage, match=f"^{reason.replace('(', '[(]').replace(')', '[)]')}$"):
        analyze_bytes(data)


def test_truncated_jpeg_is_an_image_with_a_decode_error():
    data = image_bytes("JPEG", (300, 200), seed=3)
    facts = analyze_bytes(data[: len(data) // 2])
    assert facts.format == "JPEG" and facts.width == 300
    assert facts.decode_error == "truncated image data"
    assert facts.hashes == {}


def test_pixel_bomb_is_not_decoded():
    facts = analyze_bytes(image_bytes("PNG", (64, 64)), max_pixels=1000)
    assert facts.decode_error == "decompression bomb (64x64 pixels is over the limit of 1000)"
    assert facts.hashes == {}


def test_same_bytes_under_two_labels_is_one_image_with_two_sources(catalog):
    data = image_bytes("JPEG", seed=7)
    with catalog.session() as session:
        first = ingest_bytes(session, catalog.store, data, "cats", SourceInfo("http://a/1.jpg", "bing", query="cat"))
        again = ingest_bytes(session, catalog.store, data, "cats", SourceInfo("http://a/1.jpg", "bing", query="cat"))
        other = ingest_bytes(session, catalog.store, data, "dogs", SourceInfo("http://b/2.jpg", "baidu", rank=3))
        assert (first.new_images, again.new_images, other.new_images) == (1, 0, 0)
        assert (first.new_sources, again.new_sources, other.new_sources) == (1, 0, 1)
        assert session.scalar(select(func.count()).select_from(ImageRow)) == 1
        sources = session.execute(select(Source.uri, Source.engine, Source.rank).order_by(Source.id)).all()
        assert sources == [("http://a/1.jpg", "bing", None), ("http://b/2.jpg", "baidu", 3)]
        row = session.execute(select(ImageRow)).scalar_one()
        assert row.status == "pending" and row.format == "JPEG" and row.bytes == len(data)
        assert catalog.store.path(row.store_path).read_bytes() == data
        kinds = session.execute(select(ImageHash.kind).where(ImageHash.image_id == row.id)).scalars().all()
        assert sorted(kinds) == sorted(HASH_KINDS)
    assert list(catalog.store.temp_dir.iterdir()) == []
