"""Stored embeddings, read without the deep-learning stack: `audit` and `embed --list` need only the
catalog and NumPy (importing trainer.embed costs seconds of torch and fastai imports)."""
from __future__ import annotations

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Embedding, EmbeddingModel
from fastclass.errors import FastclassError


def load_embeddings(session: Session, model_id: int) -> tuple[list[int], np.ndarray]:
    """The image ids and vectors (float32, one row per image) stored under one embedding model."""
    model = session.get(EmbeddingModel, model_id)
    if model is None:
        raise FastclassError(f"no embedding model {model_id} (see `fastclass embed --list`)")
    rows = session.execute(select(Embedding.image_id, Embedding.vector).where(Embedding.model_id == model_id)
                           .order_by(Embedding.image_id)).all()
    if not rows:
        return [], np.zeros((0, model.dim), dtype=np.float32)
    return [r.image_id for r in rows], np.frombuffer(b"".join(r.vector for r in rows), dtype=np.float32).reshape(
        len(rows), model.dim)


def list_models(session: Session) -> list[dict]:
    """Every embedding model with how many images have a vector under it, newest first."""
    counts = dict(session.execute(select(Embedding.model_id, func.count()).group_by(Embedding.model_id)).all())
    return [{"id": m.id, "arch": m.arch, "weights": m.weights, "weights_loaded": m.weights_loaded, "size": m.size,
             "dim": m.dim, "images": counts.get(m.id, 0), "created_at": m.created_at}
            for m in session.scalars(select(EmbeddingModel).order_by(EmbeddingModel.id.desc()))]


def default_model(session: Session) -> int:
    """The embedding model an audit uses by default: the one with vectors for the most images (newest on
    a tie)."""
    models = list_models(session)
    if not models or not max(m["images"] for m in models):
        raise FastclassError("no embeddings yet: run `fastclass embed` first")
    return max(models, key=lambda m: (m["images"], m["id"]))["id"]

