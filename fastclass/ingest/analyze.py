"""What ingest learns from bytes alone: the real format, the header, perceptual hashes, or why the bytes are
not an image. Pure CPU and store work: it runs in isolated worker processes (fastclass/workers.py)."""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFile

from fastclass.ingest import MAX_BYTES, MAX_PIXELS
from fastclass.ingest.hashes import compute_hashes
from fastclass.store import Store, StoredFile
from fastclass.workers import memory_budget

DEFAULT_MAX_BYTES = MAX_BYTES
DEFAULT_MAX_PIXELS = MAX_PIXELS  # verify enforces the configured limit
HASH_DRAFT_SIZE = (32, 32)

EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "TIFF": "tif", "PPM": "ppm"}

# fastclass checks the pixel count itself before any decode, so Pillow's warning/raise is redundant here.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

class NotAnImage(Exception):
    """The bytes are not an image fastclass can store; the message is the reason recorded for the skip."""


@dataclass(frozen=True)
class ImageFacts:
    """What ingest learns from the bytes alone."""

    sha256: str
    format: str
    width: int
    height: int
    mode: str
    nbytes: int
    hashes: dict[str, int]
    decode_error: str | None = None

    @property
    def ext(self) -> str:
        return EXTENSIONS.get(self.format, self.format.lower())

def _sniff_non_image(data: bytes) -> str | None:
    if not data:
        return "empty file"
    head = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"<"):
        if b"<svg" in data[:4096].lower():
            return "vector image (SVG) is not supported"
        return "not an image (HTML/XML text)"
    return None


def analyze_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageFacts:
    """Identify the real format from the bytes, read the header, and hash a reduced-size decode.

    Raises NotAnImage for bytes that are not a raster image. A file whose header is fine but whose pixels
    do not decode (truncated, corrupt) is still an image: it gets `decode_error` and no hashes, and verify
    rejects it with that reason.
    """
    reason = _sniff_non_image(data)
    if reason:
        raise NotAnImage(reason)
    sha = hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            fmt, (width, height), mode = img.format or "UNKNOWN", img.size, img.mode
    except Exception as exc:  # Pillow raises many types for garbage; each means "not an image"
        raise NotAnImage(f"not an image ({type(exc).__name__})") from exc
    if width <= 0 or height <= 0:
        raise NotAnImage("not an image (zero width or height)")
    hashes: dict[str, int] = {}
    decode_error = None
    if width * height > max_pixels:
        decode_error = f"decompression bomb ({width}x{height} pixels is over the limit of {max_pixels})"
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # One reduced-size decode (JPEG DCT scaling) serves the pixel check and every hash kind.
                img.draft("L", HASH_DRAFT_SIZE)
                if not fits_memory_budget(img):
                    raise MemoryError()
                hashes = compute_hashes(img.convert("L"))
        except Exception as exc:
            decode_error = decode_reason(exc)
    return ImageFacts(sha, fmt, width, height, mode, len(data), hashes, decode_error)


MEMORY_REASON = "decoding needs more memory than the per-file limit"


def decoded_bytes(img: Image.Image) -> int:
    """What decoding the image (at its draft size, for a JPEG) takes in memory: its pixels, all frames of
    one size counted once, as Pillow holds one frame at a time."""
    width, height = img.size
    try:
        per_pixel = Image.getmodebands(img.mode) * (4 if img.mode in ("I", "F") or img.mode.startswith("I;32")
                                                    else 2 if img.mode.startswith("I;16") else 1)
    except (KeyError, ValueError):
        per_pixel = 4
    return width * height * per_pixel


def fits_memory_budget(img: Image.Image) -> bool:
    """Whether decoding fits the isolated worker's per-file memory budget (always, outside a worker)."""
    budget = memory_budget()
    return budget is None or decoded_bytes(img) <= budget


def decode_reason(exc: BaseException) -> str:
    """The reason recorded for bytes whose header reads but whose pixels do not decode (ingest and verify)."""
    if isinstance(exc, MemoryError):
        return MEMORY_REASON
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if "truncated" in text.lower() or "premature end" in text.lower():
        return "truncated image data"
    if isinstance(exc, (OSError, SyntaxError)) and ("crc" in text.lower() or "broken" in text.lower()):
        return f"corrupt image data ({text[:120]})"
    return f"cannot decode ({type(exc).__name__}: {text[:120]})"


def reason_kind(reason: str | None) -> str:
    """A reason without its figures, for summary tables ('too small (20x10 ...)' -> 'too small')."""
    return (reason or "").split(" (")[0]


def read_capped(path: Path, max_bytes: int) -> bytes:
    """Read a file, refusing one over the byte cap before reading it whole."""
    with open(path, "rb") as fh:
        # Ask for what the file holds, not the cap: a read buffer of max_bytes per file costs more than
        # the read itself. One byte more shows a file that grew (or a pipe, whose size reads 0).
        size = os.fstat(fh.fileno()).st_size
        if size > max_bytes:
            raise NotAnImage(f"file is over the size limit of {max_bytes} bytes")
        data = fh.read(size + 1)
        if len(data) > size:
            data += fh.read(max_bytes + 1 - len(data))
    if len(data) > max_bytes:
        raise NotAnImage(f"file is over the size limit of {max_bytes} bytes")
    return data


def prepare_bytes(data: bytes, store: Store, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[ImageFacts, StoredFile]:
    facts = analyze_bytes(data, max_pixels)
    return facts, store.put(facts.sha256, facts.ext, data)


# Any constant: the advisory lock that writers of images, sources and the fetch log take turns on.
