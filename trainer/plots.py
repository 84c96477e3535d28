"""The pictures a run leaves beside its numbers: curves, lr_find, confusion matrix, top losses, comparisons.

Every figure is drawn with matplotlib's Agg backend (no display needed) and written beside, then renamed,
so a run killed mid-write never leaves a truncated PNG.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from trainer.runs import EpochRow

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    fig.savefig(partial, format="png")
    _pyplot().close(fig)
    os.replace(partial, path)


def _boundaries(rows: Sequence[EpochRow]) -> list[tuple[float, str]]:
    """Where the phase or the image size changes, as x positions between epochs, with what changed."""
    marks = []
    for before, after in zip(rows, rows[1:]):
        changes = []
        if after.phase != before.phase:
            changes.append(after.phase)
        if after.size != before.size:
            changes.append(f"{after.size}px")
        if changes:
            marks.append((after.epoch - 0.5, " ".join(changes)))
    return marks


def plot_curves(rows: Sequence[EpochRow], path: Path, title: str, exported: int | None = None) -> None:
    """Train/valid loss and accuracy by epoch; phase and size changes marked; the exported epoch starred."""
    plt = _pyplot()
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    epochs = [r.epoch for r in rows]
    loss_ax.plot(epochs, [r.train_loss for r in rows], "o-", label="train loss", color=COLORS[0])
    loss_ax.plot(epochs, [r.valid_loss for r in rows], "o-", label="valid loss", color=COLORS[1])
    metric_ax.plot(epochs, [r.accuracy for r in rows], "o-", label="accuracy", color=COLORS[2])
    metric_ax.plot(epochs, [r.error_rate for r in rows], "o-", label="error rate", color=COLORS[3])
    if exported is not None:
        row = next((r for r in rows if r.epoch == exported), None)
        if row is not None and row.valid_loss is not None:
            loss_ax.plot([row.epoch], [row.valid_loss], "*", markersize=16, color="gold", markeredgecolor="black",
                         label=f"exported (epoch {row.epoch})")
    for ax in (loss_ax, metric_ax):
        for x, text in _boundaries(rows):
            ax.axvline(x, color="gray", linestyle="--", linewidth=1)
            ax.annotate(text, (x, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                        textcoords="offset points", fontsize=8, color="gray")
        ax.set_xlabel("epoch")
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    loss_ax.set_ylabel("loss")
    metric_ax.set_ylabel("valid metric")
    metric_ax.set_ylim(-0.02, 1.02)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def save_lr_find(recorder, suggestion: float, path: Path) -> None:
    """fastai's own lr_find plot (loss against learning rate) with the chosen rate marked, as a file."""
    plt = _pyplot()
    recorder.plot_lr_find()
    fig = plt.gcf()
    ax = fig.axes[0]
    ax.axvline(suggestion, color="red", linestyle="--", linewidth=1)
    ax.set_title(f"lr_find: chose {suggestion:.2e} (valley)")
    fig.set_dpi(100)
    fig.set_size_inches(6, 4)
    fig.tight_layout()
    _save(fig, path)


def plot_confusion(matrix: list[list[int]], labels: list[str], path: Path, title: str) -> None:
    plt = _pyplot()
    n = len(labels)
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * n + 2), max(4, 0.6 * n + 2)), dpi=100)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=90)
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    peak = max((max(row) for row in matrix), default=0)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(matrix[i][j]), ha="center", va="center",
                    color="white" if matrix[i][j] > peak / 2 else "black")
    fig.tight_layout()
    _save(fig, path)


def plot_top_losses(items: list[dict], path: Path, title: str, columns: int = 5) -> None:
    """A grid of images, each titled given / predicted / probability / loss (fastai's plot_top_losses).

    `items` need "file" (a readable image path, or None when the file is gone), "label", "predicted",
    "probability" and "loss"."""
    from PIL import Image

    plt = _pyplot()
    rows = max(1, -(-len(items) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.9 * rows + 0.4), dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, item in zip(axes.ravel(), items):
        try:
            with Image.open(item["file"]) as image:
                image.thumbnail((256, 256))
                ax.imshow(image.convert("RGB"))
        except (OSError, TypeError, ValueError):
            ax.text(0.5, 0.5, "file missing", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{item['label']} / {item['predicted']}\n{item['probability']:.2f} / {item['loss']:.2f}",
                     fontsize=9, color="black" if item["label"] == item["predicted"] else "firebrick")
    fig.suptitle(f"{title}\ngiven / predicted, probability / loss")
    fig.tight_layout()
    _save(fig, path)


def plot_compare(runs: dict[int, Sequence[EpochRow]], path: Path) -> None:
    """Several runs' valid loss and accuracy by epoch on the same axes, one colour per run."""
    plt = _pyplot()
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for n, (run_id, rows) in enumerate(runs.items()):
        color = COLORS[n % len(COLORS)]
        epochs = [r.epoch for r in rows]
        loss_ax.plot(epochs, [r.valid_loss for r in rows], "o-", color=color, label=f"run {run_id} valid")
        loss_ax.plot(epochs, [r.train_loss for r in rows], ":", color=color, label=f"run {run_id} train")
        metric_ax.plot(epochs, [r.accuracy for r in rows], "o-", color=color, label=f"run {run_id}")
    loss_ax.set_ylabel("loss")
    metric_ax.set_ylabel("valid accuracy")
    metric_ax.set_ylim(-0.02, 1.02)
    for ax in (loss_ax, metric_ax):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("runs " + ", ".join(str(r) for r in runs))
    fig.tight_layout()
    _save(fig, path)
