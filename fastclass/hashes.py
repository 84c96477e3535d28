"""Registry of perceptual hash kinds; each turns a (reduced, grayscale) image into a signed 64-bit integer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import imagehash
from PIL import Image

HashFunction = Callable[[Image.Image], int]


@dataclass(frozen=True)
class HashKind:
    name: str
    version: int
    compute: HashFunction


HASH_KINDS: dict[str, HashKind] = {}


def register_hash(name: str, version: int) -> Callable[[HashFunction], HashFunction]:
    """Register a hash kind; bump `version` whenever its output for the same image changes."""

    def decorate(fn: HashFunction) -> HashFunction:
        HASH_KINDS[name] = HashKind(name, version, fn)
        return fn

    return decorate


def to_signed64(value: int) -> int:
    """Unsigned 64-bit hash -> the signed integer a BIGINT column holds."""
    return value - (1 << 64) if value >= (1 << 63) else value


def to_unsigned64(value: int) -> int:
    return value + (1 << 64) if value < 0 else value


def _bits_to_int(h: imagehash.ImageHash) -> int:
    return to_signed64(int(str(h), 16))


@register_hash("phash", version=1)
def phash(gray: Image.Image) -> int:
    return _bits_to_int(imagehash.phash(gray, hash_size=8))


@register_hash("phash_flip", version=1)
def phash_flip(gray: Image.Image) -> int:
    """pHash of the mirrored image, so that `dedup --flip` finds left-right mirrored copies."""
    return _bits_to_int(imagehash.phash(gray.transpose(Image.Transpose.FLIP_LEFT_RIGHT), hash_size=8))


@register_hash("dhash", version=1)
def dhash(gray: Image.Image) -> int:
    return _bits_to_int(imagehash.dhash(gray, hash_size=8))


def compute_hashes(gray: Image.Image) -> dict[str, int]:
    return {kind.name: kind.compute(gray) for kind in HASH_KINDS.values()}
