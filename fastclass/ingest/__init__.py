"""Bringing images in: analysing bytes, perceptual hashes, recording images and provenance, importing folders."""

MAX_PIXELS = 89_478_485
"""Pixels an image may have before it is a decompression bomb (Pillow's own threshold); ingest and verify's default."""
MAX_BYTES = 20 * 1024 * 1024
"""Bytes one image file may have (import and crawl's default)."""
