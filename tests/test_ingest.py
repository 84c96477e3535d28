"""Ingest: the real format from the bytes, hashes, one image per content with one source per provenance."""
from __future__ import annotations

import random

import pytest
from sqlalchemy import func, select

from db.models import Image as ImageRow
from db.models import ImageHash, Source
from fastclass.hashes import HASH_KINDS, to_unsigned64
from fastclass.sample import jpeg_bytes, load_photo, random_crop
from fastclass.ingest import NotAnImage, SourceInfo, analyze_bytes, ingest_bytes
from tests.conftest import image_bytes


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
