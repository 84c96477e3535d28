"""Snapshot -> fastai DataLoaders: the snapshot's rows (store path, label, split) are the dataset, not folders.

Two item pipelines feed the same batch transforms. From files: decode and presize each image every epoch
(about 10 ms of one CPU core for a 640x480 JPEG at presize 460). From the presize cache: every image decoded
once, centre-cropped and resized to presize x presize, kept as uint8 in one memory-mapped file next to the
runs, so an epoch costs a memory copy per image; that is what keeps a GPU fed (see docs/training.md).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from fastai.vision.all import TensorImage, Transform
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Snapshot
from fastclass.dataset.snapshot import snapshot_items
from fastclass.errors import FastclassError
from fastclass.store import Store

log = logging.getLogger(__name__)

# The seeds' presizing: items are resized to about twice the final size, then augmented and cropped per batch.
PRESIZE_FACTOR = 460 / 224


@dataclass(frozen=True)
class SnapshotData:
    """A snapshot's images as a table (columns image_id, sha256, store_path, path (a local file), label,
    is_valid) and its label vocabulary."""

    name: str
    snapshot_id: int
    digest: str
    frame: pd.DataFrame
    vocab: list[str]

    @property
    def train_count(self) -> int:
        return int((~self.frame.is_valid).sum())

    @property
    def valid_count(self) -> int:
        return int(self.frame.is_valid.sum())


def snapshot_data(session: Session, store: Store, name: str) -> SnapshotData:
    """The snapshot's images, checked to be trainable: every file present, two labels, both splits."""
    items = snapshot_items(session, name)
    missing = set(store.missing(item.store_path for item in items))
    if missing:
        first = next(item for item in items if item.store_path in missing)
        raise FastclassError(f"{len(missing)} file(s) of snapshot {name!r} are missing from the image store "
                             f"{store.root} (first: {first.store_path}, image {first.image_id}); "
                             "restore the store, or make a new snapshot without them")
    store.fetch(item.store_path for item in items)
    frame = pd.DataFrame({
        "image_id": [i.image_id for i in items],
        "sha256": [i.sha256 for i in items],
        "store_path": [i.store_path for i in items],
        "path": [str(store.path(i.store_path)) for i in items],
        "label": [i.label for i in items],
        "is_valid": [bool(i.is_valid) for i in items],
    })
    vocab = sorted(frame.label.unique().tolist())
    if len(vocab) < 2:
        raise FastclassError(f"snapshot {name!r} has {len(vocab)} label(s); a classifier needs at least two")
    snapshot_id, digest = session.execute(select(Snapshot.id, Snapshot.digest).where(Snapshot.name == name)).one()
    data = SnapshotData(name, snapshot_id, digest, frame, vocab)
    if data.valid_count == 0 or data.train_count == 0:
        raise FastclassError(f"snapshot {name!r} has {data.train_count} train and {data.valid_count} valid image(s); "
                             "training needs both (see `fastclass split --valid-pct`)")
    return data


def presize_for(size: int, presize: int | None) -> int:
    return presize or round(size * PRESIZE_FACTOR)


def presized_pixels(path: str, presize: int) -> np.ndarray:
    """An image as the cache holds it: RGB, centre square, presize x presize, uint8 (H, W, 3). A JPEG at
    least twice as big as needed is decoded at reduced size (DCT scaling), which is several times faster."""
    with Image.open(path) as img:
        img.draft("RGB", (presize, presize))
        img = img.convert("RGB")
        width, height = img.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        square = img.crop((left, top, left + side, top + side))
        return np.asarray(square.resize((presize, presize), Image.BILINEAR))


class PresizeCache:
    """A snapshot's images at one presize, row i = row i of its table, in one uint8 file opened lazily (so
    each loader process maps it itself)."""

    def __init__(self, path: Path, count: int, presize: int) -> None:
        self.path, self.shape = path, (count, presize, presize, 3)
        self._pixels: np.memmap | None = None

    def __getitem__(self, row: int) -> np.ndarray:
        if self._pixels is None:
            self._pixels = np.memmap(self.path, dtype=np.uint8, mode="r", shape=self.shape)
        return self._pixels[row]

    def __getstate__(self) -> dict:
        return {"path": self.path, "shape": self.shape, "_pixels": None}

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))


def presize_cache(data: SnapshotData, presize: int, folder: Path, threads: int | None = None,
                  progress: Callable[[int, int, str], None] | None = None) -> PresizeCache:
    """The cache of a snapshot at a presize, built (in threads: Pillow decodes without the GIL) unless a
    complete one exists. Keyed by the snapshot's content digest; written under a temp name and renamed, so
    an interrupted build leaves no cache that looks complete."""
    count = len(data.frame)
    stem = f"{data.digest[:20]}-{presize}"
    path, meta = folder / f"{stem}.u8", folder / f"{stem}.json"
    cache = PresizeCache(path, count, presize)
    if meta.exists() and path.exists() and json.loads(meta.read_text()).get("shape") == list(cache.shape):
        return cache
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if cache.nbytes > 0.8 * free:
        raise FastclassError(f"the presize cache needs {cache.nbytes / 2**30:.1f} GiB but {folder} has "
                             f"{free / 2**30:.1f} GiB free; free space or train with --no-cache")
    temp = folder / f".{stem}.{os.getpid()}.partial"
    try:
        _write_cache(temp, cache.shape, list(data.frame.path), threads or os.cpu_count() or 1, progress)
        os.replace(temp, path)
    except OSError as exc:
        raise FastclassError(f"cannot write the presize cache in {folder}: {exc.strerror or exc}; "
                             "free space or train with --no-cache") from exc
    finally:
        temp.unlink(missing_ok=True)
    meta.write_text(json.dumps({"snapshot": data.name, "digest": data.digest, "presize": presize,
                                "shape": list(cache.shape)}) + "\n")
    log.info("presize cache of %s at %d px: %s (%.1f GiB)", data.name, presize, path, cache.nbytes / 2**30)
    return cache


def _write_cache(path: Path, shape: tuple[int, ...], files: list[str], threads: int,
                 progress: Callable[[int, int, str], None] | None) -> None:
    pixels = np.memmap(path, dtype=np.uint8, mode="w+", shape=shape)

    def fill(row: int) -> None:
        pixels[row] = presized_pixels(files[row], shape[1])

    with ThreadPoolExecutor(threads) as pool:
        for done, _ in enumerate(pool.map(fill, range(len(files))), start=1):
            if progress is not None and (done % 64 == 0 or done == len(files)):
                progress(done, len(files), f"presize cache {shape[1]}px")
    pixels.flush()


def build_dataloaders(data: SnapshotData, size: int, presize: int | None, bs: int, workers: int, flip: bool,
                      stats: tuple[list[float], list[float]], device, cache: PresizeCache | None = None):
    """fastai DataLoaders: Resize(presize) per item, then flip/rotate/zoom/light and a crop to `size` per batch
    on the device, normalised with the architecture's statistics. Shuffling follows the global seed
    (`fastai.torch_core.set_seed`), so the caller seeds first. With `cache`, items come from it instead
    of the files (its presize wins)."""
    from fastai.vision.all import (
        CategoryBlock,
        ColReader,
        ColSplitter,
        DataBlock,
        ImageBlock,
        IntToFloatTensor,
        Normalize,
        Resize,
        TransformBlock,
        aug_transforms,
    )

    if cache is None:
        images, get_x, item_tfms = ImageBlock, ColReader("path"), [Resize(presize_for(size, presize))]
        frame = data.frame
    else:
        images = TransformBlock(type_tfms=CachedImage(cache), batch_tfms=IntToFloatTensor)
        get_x, item_tfms, frame = ColReader("row"), [], data.frame.assign(row=range(len(data.frame)))
    block = DataBlock(
        blocks=(images, CategoryBlock(vocab=data.vocab)),
        get_x=get_x,
        get_y=ColReader("label"),
        splitter=ColSplitter("is_valid"),
        item_tfms=item_tfms,
        batch_tfms=[*aug_transforms(size=size, min_scale=0.75, do_flip=flip), Normalize.from_stats(*stats)],
    )
    bs = max(1, min(bs, data.train_count))
    pin = getattr(device, "type", str(device)) == "cuda"
    return block.dataloaders(frame, bs=bs, num_workers=workers, device=device, pin_memory=pin,
                             persistent_workers=workers > 0)


class CachedImage(Transform):
    """Type transform of cached items: row number -> the cached uint8 image as a (3, H, W) TensorImage."""

    def __init__(self, cache: PresizeCache) -> None:
        super().__init__()
        self.cache = cache

    def encodes(self, row) -> TensorImage:
        return TensorImage(torch.from_numpy(np.array(self.cache[int(row)])).permute(2, 0, 1))
