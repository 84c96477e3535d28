"""`fastclass embed`: a pretrained backbone's pooled features for every `ok` image, stored once per model.

An embedding model is (architecture, weights, input size); the weights are named by what they are
("pretrained", or the sha256 of a weights file). Each batch of vectors is committed as it is computed, so
a killed `embed` keeps what it did and a re-run computes only the images that have no vector yet.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from db.models import Embedding, EmbeddingModel, Image, ImageStatus
from fastclass.errors import FastclassError
from fastclass.labels import existing_label_id
from fastclass.store import Store
from trainer.archs import NO_WEIGHTS, PRETRAINED, build_body, get_arch
from trainer.train import resolve_device


@dataclass
class EmbedResult:
    model_id: int
    arch: str
    weights: str
    size: int
    dim: int
    device: str
    images: int
    """`ok` images in scope (all, or --label's)."""
    computed: int = 0
    already: int = 0
    """Images that had a vector under this model before: not computed again."""
    failed: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def weights_key(weights: str) -> str:
    """What the weights are, for the model's identity: "pretrained", or the sha256 of a weights file."""
    if weights == PRETRAINED:
        return PRETRAINED
    digest = hashlib.sha256()
    try:
        with open(weights, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise FastclassError(f"cannot read the weights file {weights}: {exc.strerror or exc}") from None
    return f"sha256:{digest.hexdigest()}"


def _pooled(body):
    from torch import nn

    if body.needs_pool:
        return nn.Sequential(body.module, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return body.module


class _Images:
    """(id, pixels) per image: the shorter side resized to `size`, the centre square, normalised; a file
    that cannot be read gives its reason instead of pixels, so one bad file fails alone."""

    def __init__(self, items: list[tuple[int, str]], size: int, stats) -> None:
        self.items, self.size = items, size
        self.mean = np.array(stats[0], dtype=np.float32).reshape(3, 1, 1)
        self.std = np.array(stats[1], dtype=np.float32).reshape(3, 1, 1)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        from PIL import Image as PILImage
        from PIL import ImageOps

        image_id, path = self.items[index]
        try:
            with PILImage.open(path) as image:
                image = ImageOps.exif_transpose(image).convert("RGB")
                image = ImageOps.fit(image, (self.size, self.size), PILImage.BILINEAR)
                pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
        except Exception as exc:  # a decoder raises what the bytes provoke; the image is reported, not fatal
            return image_id, None, f"{type(exc).__name__}: {str(exc)[:200]}"
        return image_id, (pixels - self.mean) / self.std, None


def _collate(batch):
    return batch


def to_embed(session: Session, columns: tuple, label: str | None = None,
             id_range: tuple[int, int] | None = None) -> Select:
    """The images an embed covers: the `ok` ones, of `label`, with an id in `id_range`; in-process and
    queued embed choose them here alike."""
    query = select(*columns).where(Image.status == ImageStatus.OK.value)
    if label is not None:
        query = query.where(Image.label_id == existing_label_id(session, label))
    if id_range is not None:
        query = query.where(Image.id.between(*id_range))
    return query


def _model_row(session: Session, row: EmbeddingModel) -> EmbeddingModel:
    """Record a new embedding model; when another process (a queued chunk on another worker) recorded the
    same one first, use theirs."""
    from sqlalchemy.exc import IntegrityError

    session.add(row)
    try:
        session.commit()
        return row
    except IntegrityError:
        session.rollback()
        return session.scalars(select(EmbeddingModel).where(
            EmbeddingModel.arch == row.arch, EmbeddingModel.weights == row.weights,
            EmbeddingModel.size == row.size)).one()


def embed_images(session: Session, store: Store, arch: str = "resnet34", weights: str = PRETRAINED,
                 size: int = 224, bs: int = 64, device: str = "auto", label: str | None = None,
                 workers: int = 0, progress: Callable[[int, int, str], None] | None = None,
                 id_range: tuple[int, int] | None = None) -> EmbedResult:
    """Vectors for the `ok` images (of `label`, with an id in `id_range` for a queued chunk) that have none
    under this model yet; committed per batch."""
    import torch

    if weights == NO_WEIGHTS:
        raise FastclassError("embed needs trained weights (--pretrained or --weights FILE): the features of a "
                             "random network say nothing about what an image shows")
    if size < 16:
        raise FastclassError("--size must be at least 16 pixels")
    if bs < 1:
        raise FastclassError("--bs must be at least 1")
    spec = get_arch(arch)
    key = weights_key(weights)
    torch_device = resolve_device(device)
    query = to_embed(session, (Image.id, Image.store_path), label, id_range)
    in_scope = session.execute(query.order_by(Image.id)).all()
    model_row = session.scalar(select(EmbeddingModel).where(
        EmbeddingModel.arch == spec.name, EmbeddingModel.weights == key, EmbeddingModel.size == size))
    done = set()
    if model_row is not None:
        done = set(session.scalars(select(Embedding.image_id).where(Embedding.model_id == model_row.id)))
    todo = [(row.id, row.store_path) for row in in_scope if row.id not in done]
    if model_row is not None and not todo:  # nothing to compute: no need to build the model (a chunk re-run)
        return EmbedResult(model_row.id, spec.name, model_row.weights_loaded, size, model_row.dim, str(torch_device),
                           len(in_scope), already=len(in_scope))
    started = time.monotonic()
    body = build_body(spec, weights)
    if model_row is None:
        model_row = _model_row(session, EmbeddingModel(arch=spec.name, weights=key, weights_loaded=body.weights,
                                                       size=size, dim=body.features))
    result = EmbedResult(model_row.id, spec.name, body.weights, size, model_row.dim, str(torch_device),
                         len(in_scope), already=len(in_scope) - len(todo))
    missing = set(store.missing(path for _, path in todo))
    for image_id, path in todo:
        if path in missing:
            result.failed.append({"image": image_id, "reason": "file missing from the image store"})
    todo = [(image_id, path) for image_id, path in todo if path not in missing]
    store.fetch(path for _, path in todo)
    items = [(image_id, str(store.path(path))) for image_id, path in todo]
    model = _pooled(body).to(torch_device).eval()
    loader = torch.utils.data.DataLoader(_Images(items, size, spec.stats), batch_size=bs, num_workers=workers,
                                         collate_fn=_collate)
    with torch.inference_mode():
        for batch in loader:
            good = [(image_id, pixels) for image_id, pixels, _ in batch if pixels is not None]
            result.failed += [{"image": image_id, "reason": reason} for image_id, _, reason in batch if reason]
            if good:
                x = torch.from_numpy(np.stack([p for _, p in good])).to(torch_device)
                vectors = model(x).float().cpu().numpy().astype(np.float32)
                session.add_all(Embedding(model_id=model_row.id, image_id=image_id, vector=vector.tobytes())
                                for (image_id, _), vector in zip(good, vectors))
                session.commit()
                result.computed += len(good)
            if progress is not None:
                progress(result.computed + len(result.failed), len(todo) + len(missing),
                         f"{spec.name} {size}px on {torch_device.type}")
    result.seconds = round(time.monotonic() - started, 2)
    return result
