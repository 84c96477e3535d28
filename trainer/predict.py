"""`fastclass predict`: classes and probabilities for new images from an exported run (no catalog needed)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from fastclass.errors import FastclassError
from trainer.interpret import load_exported, probabilities
from trainer.runs import EXPORT_NAME


@dataclass
class Prediction:
    path: str
    label: str | None = None
    probability: float | None = None
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None
    unknown: bool = False
    """The top class's probability was under the threshold: the answer is `unknown` (label None)."""

    def as_dict(self) -> dict:
        return {"path": self.path, "label": self.label, "probability": self.probability,
                "top": [{"label": name, "probability": p} for name, p in self.top], "error": self.error,
                "unknown": self.unknown}


def export_path(run_dir: Path) -> Path:
    """The exported model of a run folder (or the file itself when given one)."""
    return run_dir if run_dir.is_file() else run_dir / EXPORT_NAME


def expand_inputs(inputs: list[Path]) -> list[Path]:
    """Files as given, and every file under a given folder (sorted), skipping hidden ones."""
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif item.exists():
            files.append(item)
        else:
            raise FastclassError(f"{item} does not exist")
    return files


def _unreadable(path: Path) -> str | None:
    try:
        with Image.open(path) as img:
            img.load()
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return f"cannot decode: {str(exc)[:120]}"
    return None


def predict_images(run: Path, inputs: list[Path], tta: bool = False, device: str = "cpu",
                   top_k: int = 3, threshold: float = 0.0) -> list[Prediction]:
    """Predict each image with a run's exported model (`run`: its folder or export.pkl); a file that is not
    a decodable image gets its reason instead of a label. A classifier always names one of its classes:
    with a threshold, an image whose top probability is under it is `unknown` instead (its top classes
    are still listed), so an astronaut is not confidently a motorcycle."""
    import pandas as pd

    files = expand_inputs(inputs)
    if not files:
        raise FastclassError("no files to predict")
    results = [Prediction(str(path), error=_unreadable(path)) for path in files]
    good = [r for r in results if r.error is None]
    if not good:
        return results
    learn = load_exported(export_path(run), device)
    vocab = [str(v) for v in learn.dls.vocab]
    probs = probabilities(learn, pd.DataFrame({"path": [r.path for r in good]}), tta).float()
    k = min(top_k, len(vocab))
    values, indexes = probs.topk(k, dim=1)
    for result, vals, idxs in zip(good, values.tolist(), indexes.tolist()):
        result.top = [(vocab[i], round(v, 4)) for v, i in zip(vals, idxs)]
        result.label, result.probability = result.top[0]
        if vals[0] < threshold:
            result.label, result.unknown = None, True
    return results
