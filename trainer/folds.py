"""`train --folds K`: every image of the snapshot gets a loss from a model that never trained on it.

`interpret`'s losses come from the run's own model, which trained on most of the images it scores: it has
memorised them, so a mislabeled training image often has a low loss. With --folds K, once the run is done,
K more models are trained the same way (same architecture, weights, sizes, epochs and learning rate), each
on the snapshot's images outside one of K label-stratified folds, and each predicts its own fold. Those
out-of-fold losses are stored in `fold_losses`, all folds in one transaction, and `clean --order loss
--run RUN` uses them in place of interpret's when the run has them.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np
from sqlalchemy.orm import Session

from db.models import FoldLoss
from trainer.data import SnapshotData


def fold_assignment(data: SnapshotData, folds: int, seed: int) -> np.ndarray:
    """Each image's fold (0..folds-1), stratified by label, over train and valid images together."""
    from sklearn.model_selection import StratifiedKFold

    labels = data.frame.label.to_numpy()
    fold = np.zeros(len(labels), dtype=np.int64)
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    for k, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        fold[held_out] = k
    return fold


def check_folds(data: SnapshotData, folds: int) -> None:
    """Refuse folds that some label cannot fill: every fold model must see every label."""
    from fastclass.errors import FastclassError

    counts = data.frame.label.value_counts()
    count, name = min((int(n), label) for label, n in counts.items())
    if count < folds:
        raise FastclassError(f"--folds {folds}: label {name!r} has {count} image(s) in the snapshot, fewer than "
                             f"the folds (every fold needs each label); use --folds {max(2, count)} or fewer")


def record_fold_losses(session: Session, run_id: int, data: SnapshotData, folds: int, seed: int,
                       train_fold: Callable[[int, SnapshotData], "object"], stage: Callable[[str], None]) -> int:
    """Train one model per fold with `train_fold(k, fold_data)` (fold_data's valid split is fold k; it
    returns the fitted fastai Learner), predict fold k with it, and store every image's out-of-fold
    prediction and loss. Returns the number of images scored."""
    from trainer.interpret import judge, store_verdicts

    fold = fold_assignment(data, folds, seed)
    vocab = list(data.vocab)
    rows = []
    for k in range(folds):
        held_out = fold == k
        fold_data = replace(data, frame=data.frame.assign(is_valid=held_out))
        stage(f"fold {k + 1}/{folds}: training on {int((~held_out).sum())} images, predicting the other "
              f"{int(held_out.sum())}")
        learn = train_fold(k, fold_data)
        probs, _ = learn.get_preds(dl=learn.dls.valid)
        frame = fold_data.frame[held_out]
        _, losses, best, predicted = judge(probs.float(), frame.label, vocab)
        rows += [{"run_id": run_id, "image_id": int(image_id), "fold": k, "label": label,
                  "predicted": vocab[int(p)], "probability": float(b), "loss": float(loss)}
                 for image_id, label, p, b, loss in zip(frame.image_id, frame.label, predicted, best, losses)]
    store_verdicts(session, FoldLoss, run_id, rows)
    return len(rows)
