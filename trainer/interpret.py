"""`fastclass interpret`: a trained run's confusion matrix, most-confused pairs, per-class accuracy and losses.

Every image of the run's snapshot gets the run's prediction and loss in `run_losses`; the highest losses
are the images most likely mislabeled, which `fastclass clean --order loss --run RUN` shows first.
"""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sqlalchemy import delete, insert
from sqlalchemy.orm import Session

from db.models import RunLoss, RunStatus, Snapshot
from fastclass.catalog import find_run
from fastclass.errors import FastclassError, first_line
from fastclass.store import Store
from trainer.data import snapshot_data
from trainer.plots import plot_confusion, plot_top_losses
from trainer.runs import EXPORT_NAME

INSERT_CHUNK = 1000


@dataclass
class InterpretResult:
    run_id: int
    out_dir: Path
    images: int
    valid_images: int
    valid_accuracy: float
    labels: list[str]
    confusion: list[list[int]]
    per_class: list[dict] = field(default_factory=list)
    most_confused: list[dict] = field(default_factory=list)
    top_losses: list[dict] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        data = asdict(self)
        data["out_dir"] = str(self.out_dir)
        return data


def load_exported(path: Path, device: str = "cpu"):
    """An exported learner (runs/<id>/export.pkl); fastai's export is a pickle, so only load runs you trust."""
    import warnings

    from fastai.learner import load_learner

    if not path.is_file():
        raise FastclassError(f"no exported model at {path}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="load_learner` uses Python's insecure pickle")
        try:
            return load_learner(path, cpu=device == "cpu")
        except Exception as exc:  # unpickling raises whatever the broken file provokes
            raise FastclassError(f"cannot load the exported model {path}: {type(exc).__name__}: "
                                 f"{first_line(exc)[:200]}") from exc


def probabilities(learn, frame, tta: bool = False):
    """Class probabilities for the images in `frame` (column path), with the validation transforms."""
    dl = learn.dls.test_dl(frame, bs=64, num_workers=0)
    if tta:
        return learn.tta(dl=dl)[0]
    return learn.get_preds(dl=dl)[0]


def judge(probs, labels, vocab: list[str]) -> tuple:
    """(targets, losses, best probabilities, predicted class indices) of class probabilities against the
    given labels: each image's loss is -log of the probability of its own label."""
    import torch

    index = {name: i for i, name in enumerate(vocab)}
    targets = torch.tensor([index[name] for name in labels])
    losses = -torch.log(probs[torch.arange(len(targets)), targets].clamp_min(1e-12))
    best, predicted = probs.max(dim=1)
    return targets, losses, best, predicted


def store_verdicts(session: Session, table, run_id: int, rows: list[dict]) -> None:
    """Replace a run's rows in `table` (run_losses or fold_losses) with `rows`, in one transaction."""
    session.execute(delete(table).where(table.run_id == run_id))
    for start in range(0, len(rows), INSERT_CHUNK):
        session.execute(insert(table), rows[start:start + INSERT_CHUNK])
    session.commit()


def interpret_run(session: Session, store: Store, run_ref: str, out_dir: Path | None = None,
                  top: int = 20, device: str = "cpu") -> InterpretResult:
    """Predict every image of the run's snapshot, store each image's loss, write the reports to out_dir."""
    import torch

    run = find_run(session, run_ref)
    if run.status != RunStatus.DONE.value:
        raise FastclassError(f"run {run.id} did not finish (status {run.status}); only a finished run has a model")
    learn = load_exported(Path(run.artifact_dir) / EXPORT_NAME, device)
    snapshot = session.get(Snapshot, run.snapshot_id)
    data = snapshot_data(session, store, snapshot.name)
    vocab = [str(v) for v in learn.dls.vocab]
    unknown = sorted(set(data.vocab) - set(vocab))
    if unknown:
        raise FastclassError(f"snapshot {snapshot.name!r} has labels the run's model does not know: {unknown[:5]}")
    probs = probabilities(learn, data.frame).float()
    targets, losses, best, predicted = judge(probs, data.frame.label, vocab)

    rows = [{"run_id": run.id, "image_id": int(image_id), "is_valid": bool(is_valid), "label": label,
             "predicted": vocab[int(p)], "probability": float(b), "loss": float(loss)}
            for image_id, is_valid, label, p, b, loss in zip(data.frame.image_id, data.frame.is_valid, data.frame.label,
                                                             predicted, best, losses)]
    store_verdicts(session, RunLoss, run.id, rows)

    valid = torch.tensor(data.frame.is_valid.to_numpy())
    confusion = torch.zeros(len(vocab), len(vocab), dtype=torch.long)
    for actual, guess in zip(targets[valid].tolist(), predicted[valid].tolist()):
        confusion[actual, guess] += 1
    result = InterpretResult(run.id, Path(out_dir or Path(run.artifact_dir) / "interpret").resolve(), len(rows),
                             int(valid.sum()), float(confusion.diagonal().sum()) / max(1, int(valid.sum())), vocab,
                             confusion.tolist())
    for i, name in enumerate(vocab):
        total = int(confusion[i].sum())
        result.per_class.append({"label": name, "valid": total, "correct": int(confusion[i, i]),
                                 "accuracy": int(confusion[i, i]) / total if total else None})
    pairs = [(int(confusion[i, j]), vocab[i], vocab[j]) for i in range(len(vocab)) for j in range(len(vocab))
             if i != j and confusion[i, j] > 0]
    result.most_confused = [{"actual": a, "predicted": p, "count": n} for n, a, p in sorted(pairs, key=lambda t: (-t[0], t[1], t[2]))]
    order = sorted(range(len(rows)), key=lambda k: -rows[k]["loss"])[:top]
    result.top_losses = [{"image": rows[k]["image_id"], "sha256": data.frame.sha256.iloc[k],
                          "store_path": data.frame.store_path.iloc[k],
                          "split": "valid" if rows[k]["is_valid"] else "train", "label": rows[k]["label"],
                          "predicted": rows[k]["predicted"], "probability": round(rows[k]["probability"], 4),
                          "loss": round(rows[k]["loss"], 4)} for k in order]
    _write_reports(result, {row["image"]: data.frame.path.iloc[k] for row, k in zip(result.top_losses, order)})
    return result


def _write_reports(result: InterpretResult, files: dict[int, str]) -> None:
    """The reports beside each other; `files` maps each top-loss image to its local file, for the grid."""
    out = result.out_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
        plot_confusion(result.confusion, result.labels, out / "confusion_matrix.png",
                       f"run {result.run_id}: valid accuracy {result.valid_accuracy:.3f}")
        plot_top_losses([{**row, "file": files.get(row["image"])} for row in result.top_losses],
                        out / "top_losses.png", f"run {result.run_id}: top {len(result.top_losses)} losses")
        _write_csv(out / "most_confused.csv", ["actual", "predicted", "count"], result.most_confused)
        _write_csv(out / "per_class.csv", ["label", "valid", "correct", "accuracy"], result.per_class)
        _write_csv(out / "top_losses.csv", ["image", "sha256", "store_path", "split", "label", "predicted",
                                            "probability", "loss"], result.top_losses)
        result.files = {name: str(out / name) for name in
                        ("confusion_matrix.png", "most_confused.csv", "per_class.csv", "top_losses.csv",
                         "top_losses.png", "interpret.json")}
        (out / "interpret.json").write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    except OSError as exc:
        raise FastclassError(f"cannot write the interpretation to {out}: {exc.strerror or exc}") from exc


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        writer.writerows(rows)
