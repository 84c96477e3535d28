"""Snapshot -> fastai DataLoaders: the snapshot's rows (store path, label, split) are the dataset, not folders."""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from sqlalchemy.orm import Session

from fastclass.errors import FastclassError
from fastclass.snapshot import snapshot_items
from fastclass.store import ImageStore

# The seeds' presizing: items are resized to about twice the final size, then augmented and cropped per batch.
PRESIZE_FACTOR = 460 / 224


@dataclass(frozen=True)
class SnapshotData:
    """A snapshot's images as a table (columns image_id, sha256, path, label, is_valid) and its label vocabulary."""

    name: str
    frame: pd.DataFrame
    vocab: list[str]

    @property
    def train_count(self) -> int:
        return int((~self.frame.is_valid).sum())

    @property
    def valid_count(self) -> int:
        return int(self.frame.is_valid.sum())


def snapshot_data(session: Session, store: ImageStore, name: str) -> SnapshotData:
    """The snapshot's images, checked to be trainable: every file present, two labels, both splits."""
    items = snapshot_items(session, name)
    missing = [item for item in items if not store.exists(item.store_path)]
    if missing:
        raise FastclassError(f"{len(missing)} file(s) of snapshot {name!r} are missing from the image store "
                             f"{store.root} (first: {missing[0].store_path}, image {missing[0].image_id}); "
                             "restore the store, or make a new snapshot without them")
    frame = pd.DataFrame({
        "image_id": [i.image_id for i in items],
        "sha256": [i.sha256 for i in items],
        "path": [str(store.path(i.store_path)) for i in items],
        "label": [i.label for i in items],
        "is_valid": [bool(i.is_valid) for i in items],
    })
    vocab = sorted(frame.label.unique().tolist())
    if len(vocab) < 2:
        raise FastclassError(f"snapshot {name!r} has {len(vocab)} label(s); a classifier needs at least two")
    data = SnapshotData(name, frame, vocab)
    if data.valid_count == 0 or data.train_count == 0:
        raise FastclassError(f"snapshot {name!r} has {data.train_count} train and {data.valid_count} valid image(s); "
                             "training needs both (see `fastclass split --valid-pct`)")
    return data


def presize_for(size: int, presize: int | None) -> int:
    return presize or round(size * PRESIZE_FACTOR)


def build_dataloaders(data: SnapshotData, size: int, presize: int | None, bs: int, workers: int, flip: bool,
                      stats: tuple[list[float], list[float]], device):
    """fastai DataLoaders: Resize(presize) per item, then flip/rotate/zoom/light and a crop to `size` per batch
    on the device, normalised with the architecture's statistics. Shuffling follows the global seed
    (`fastai.torch_core.set_seed`), so the caller seeds first."""
    from fastai.vision.all import (
        CategoryBlock,
        ColReader,
        ColSplitter,
        DataBlock,
        ImageBlock,
        Normalize,
        Resize,
        aug_transforms,
    )

    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock(vocab=data.vocab)),
        get_x=ColReader("path"),
        get_y=ColReader("label"),
        splitter=ColSplitter("is_valid"),
        item_tfms=Resize(presize_for(size, presize)),
        batch_tfms=[*aug_transforms(size=size, min_scale=0.75, do_flip=flip), Normalize.from_stats(*stats)],
    )
    bs = max(1, min(bs, data.train_count))
    pin = getattr(device, "type", str(device)) == "cuda"
    return block.dataloaders(data.frame, bs=bs, num_workers=workers, device=device, pin_memory=pin,
                             persistent_workers=workers > 0)
