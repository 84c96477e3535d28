"""Registry of perceptual hash kinds; each turns a reduced grayscale image into a signed 64-bit integer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image
from scipy.fft import dct

from fastclass.registry import Registry


class HashInput:
    """A reduced grayscale image plus the intermediate results that several hash kinds share."""

    def __init__(self, gray: Image.Image) -> None:
        self.gray = gray
        self._dct32: np.ndarray | None = None

    @property
    def dct32(self) -> np.ndarray:
        """2-D DCT-II of the 32x32 Lanczos-resized image, as imagehash's phash computes it."""
        # Memoized by hand: functools.cached_property holds one lock per class on Python < 3.12, which
        # serialized every crawl download thread on this computation.
        if self._dct32 is None:
            pixels = np.asarray(self.gray.resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
            self._dct32 = dct(dct(pixels, axis=0), axis=1)
        return self._dct32


HashFunction = Callable[[HashInput], int]


@dataclass(frozen=True)
class HashKind:
    name: str
    version: int
    compute: HashFunction


HASH_KINDS: Registry[HashKind] = Registry("hash kind")


def register_hash(name: str, version: int) -> Callable[[HashFunction], HashFunction]:
    """Register a hash kind; bump `version` whenever its output for the same image changes."""

    def decorate(fn: HashFunction) -> HashFunction:
        HASH_KINDS.register(name, HashKind(name, version, fn))
        return fn

    return decorate


def to_signed64(value: int) -> int:
    """Unsigned 64-bit hash -> the signed integer a BIGINT column holds."""
    return value - (1 << 64) if value >= (1 << 63) else value


def to_unsigned64(value: int) -> int:
    return value + (1 << 64) if value < 0 else value


def bits_to_int(bits: np.ndarray) -> int:
    """Row-major boolean 8x8 -> signed 64-bit, first bit most significant (imagehash's hex order)."""
    return int.from_bytes(np.packbits(bits).tobytes(), "big", signed=True)


def _median_bits(block: np.ndarray) -> int:
    # np.median of 64 values, without its generic-path overhead (a third of a hash's time): the mean of
    # the two middle values, computed in the same order, so the bits stay identical to imagehash's.
    flat = block.ravel()
    middle = np.partition(flat, (31, 32))
    return bits_to_int(flat > (middle[31] + middle[32]) / 2)


@register_hash("phash", version=1)
def phash(inp: HashInput) -> int:
    """imagehash's phash (hash_size 8): low 8x8 DCT coefficients above their median."""
    return _median_bits(inp.dct32[:8, :8])


_FLIP_SIGNS = np.array([1.0 if k % 2 == 0 else -1.0 for k in range(8)])


@register_hash("phash_flip", version=1)
def phash_flip(inp: HashInput) -> int:
    """pHash of the mirrored image, for `dedup --flip`: mirroring flips the sign of odd horizontal frequencies."""
    return _median_bits(inp.dct32[:8, :8] * _FLIP_SIGNS)


@register_hash("dhash", version=1)
def dhash(inp: HashInput) -> int:
    """imagehash's dhash (hash_size 8): is each pixel brighter than its right neighbour, on a 9x8 resize."""
    pixels = np.asarray(inp.gray.resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    return bits_to_int(pixels[:, 1:] > pixels[:, :-1])


def compute_hashes(gray: Image.Image) -> dict[str, int]:
    inp = HashInput(gray)
    return {kind.name: kind.compute(inp) for kind in HASH_KINDS.values()}
