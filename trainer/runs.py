"""Training runs in the catalog: the run row, its epoch rows as they end, listings and lookups."""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.models import RunEpoch, RunStatus, Snapshot, TrainingRun, utcnow
from fastclass import __version__
from fastclass.catalog import find_run
from fastclass.errors import FastclassError
from fastclass.store import process_alive

CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.csv"
EXPORT_NAME = "export.pkl"
CURVES_NAME = "curves.png"
LR_FIND_NAME = "lr_find.png"
EPOCH_COLUMNS = ("epoch", "phase", "size", "train_loss", "valid_loss", "error_rate", "accuracy", "seconds",
                 "images_per_s")


@dataclass(frozen=True)
class EpochRow:
    epoch: int
    phase: str
    size: int
    train_loss: float | None
    valid_loss: float | None
    error_rate: float | None
    accuracy: float | None
    seconds: float
    images_per_s: float


def code_version() -> str:
    """fastclass's version, with the git commit (and -dirty) when it runs from a checkout."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return __version__
    try:
        described = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True,
                                   text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+{described}" if described else __version__


def start_run(session: Session, snapshot_id: int, arch: str, config: dict, device: str, runs_root: Path) -> TrainingRun:
    """Insert and commit the run row, then make its artifact folder runs_root/<id>/ with the config in it."""
    run = TrainingRun(snapshot_id=snapshot_id, arch=arch, status=RunStatus.RUNNING.value, config=json.dumps(config),
                      code_version=code_version(), device=device, host=socket.gethostname(), pid=os.getpid(),
                      artifact_dir="", started_at=utcnow())
    session.add(run)
    session.flush()
    folder = (runs_root / str(run.id)).resolve()
    run.artifact_dir = str(folder)
    session.commit()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / METRICS_NAME, "w", newline="") as fh:
            csv.writer(fh).writerow(EPOCH_COLUMNS)
    except OSError as exc:
        finish_run(session, run.id, RunStatus.FAILED, error=f"cannot write {folder}: {exc.strerror}")
        raise FastclassError(f"cannot write the run folder {folder}: {exc.strerror or exc}") from exc
    write_config(run, config)
    return run


def write_config(run: TrainingRun, config: dict) -> None:
    """The resolved config beside the run's outputs (rewritten when training resolves more, e.g. lr)."""
    run.config = json.dumps(config)
    data = {"run": run.id, "code_version": run.code_version, "device": run.device, **config}
    Path(run.artifact_dir, CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def record_epoch(session: Session, run: TrainingRun, row: EpochRow) -> None:
    """Commit one epoch's row and append it to metrics.csv, so a killed run still shows its history."""
    session.add(RunEpoch(run_id=run.id, finished_at=utcnow(), **asdict(row)))
    session.commit()
    with open(Path(run.artifact_dir, METRICS_NAME), "a", newline="") as fh:
        csv.writer(fh).writerow([getattr(row, c) for c in EPOCH_COLUMNS])


def reopen_run(session: Session, run: TrainingRun, last: EpochRow, device: str) -> list[EpochRow]:
    """Make an unfinished run running again in this process from its checkpoint, whose last epoch is `last`:
    rows recorded after it are dropped (their epochs run again), its own row is added when the kill came
    before it was recorded, and metrics.csv is rewritten to match. Returns the rows kept."""
    session.query(RunEpoch).filter(RunEpoch.run_id == run.id, RunEpoch.epoch > last.epoch).delete()
    if session.get(RunEpoch, (run.id, last.epoch)) is None:
        session.add(RunEpoch(run_id=run.id, finished_at=utcnow(), **asdict(last)))
    run.status, run.error, run.finished_at = RunStatus.RUNNING.value, None, None
    run.host, run.pid, run.device = socket.gethostname(), os.getpid(), device
    session.commit()
    rows = [EpochRow(**{c: getattr(r, c) for c in EPOCH_COLUMNS}) for r in session.scalars(
        select(RunEpoch).where(RunEpoch.run_id == run.id).order_by(RunEpoch.epoch))]
    partial = Path(run.artifact_dir, METRICS_NAME + ".partial")
    with open(partial, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(EPOCH_COLUMNS)
        writer.writerows([getattr(row, c) for c in EPOCH_COLUMNS] for row in rows)
    os.replace(partial, Path(run.artifact_dir, METRICS_NAME))
    return rows


def finish_run(session: Session, run_id: int, status: RunStatus, error: str | None = None, **metrics) -> None:
    session.rollback()
    session.execute(update(TrainingRun).where(TrainingRun.id == run_id).values(
        status=status.value, error=error, finished_at=utcnow(), **metrics))
    session.commit()


def epoch_count(session: Session, run_id: int) -> int:
    return session.scalar(select(func.count()).select_from(RunEpoch).where(RunEpoch.run_id == run_id)) or 0


def shown_status(run: TrainingRun) -> str:
    """A run whose process died without saying so (kill -9, power loss) shows as interrupted."""
    if run.status == RunStatus.RUNNING.value and not process_alive(run.host, run.pid):
        return RunStatus.INTERRUPTED.value
    return run.status


def _summary(run: TrainingRun, snapshot: str, epochs: int) -> dict:
    seconds = ((run.finished_at or utcnow()) - run.started_at).total_seconds()
    return {"id": run.id, "snapshot": snapshot, "arch": run.arch, "status": shown_status(run), "epochs": epochs,
            "valid_loss": run.valid_loss, "accuracy": run.accuracy, "tta_accuracy": run.tta_accuracy,
            "device": run.device, "started_at": run.started_at, "finished_at": run.finished_at,
            "seconds": round(seconds, 1), "error": run.error, "artifact_dir": run.artifact_dir}


def list_runs(session: Session, limit: int | None = None) -> list[dict]:
    """Runs, newest first, with their snapshot, outcome and number of recorded epochs."""
    epochs = (select(RunEpoch.run_id, func.count().label("n")).group_by(RunEpoch.run_id).subquery())
    query = (select(TrainingRun, Snapshot.name, func.coalesce(epochs.c.n, 0))
             .join(Snapshot, Snapshot.id == TrainingRun.snapshot_id)
             .outerjoin(epochs, epochs.c.run_id == TrainingRun.id).order_by(TrainingRun.id.desc()))
    if limit:
        query = query.limit(limit)
    return [_summary(run, name, n) for run, name, n in session.execute(query).all()]


def show_run(session: Session, run_id: int | str) -> dict:
    """One run: summary, resolved config, code version and every epoch row."""
    run = find_run(session, run_id)
    snapshot = session.get(Snapshot, run.snapshot_id)
    rows = session.scalars(select(RunEpoch).where(RunEpoch.run_id == run.id).order_by(RunEpoch.epoch)).all()
    data = _summary(run, snapshot.name, len(rows))
    data.update({"snapshot_digest": snapshot.digest, "config": json.loads(run.config),
                 "code_version": run.code_version, "host": run.host,
                 "epoch_rows": [{c: getattr(r, c) for c in EPOCH_COLUMNS} for r in rows]})
    return data


# Config entries every run has its own value of, or that only restate another: not "differences".
NOT_COMPARED = {"labels", "stats", "train_images", "valid_images", "weights_loaded"}


def compare_runs(session: Session, refs: list[str]) -> dict:
    """Runs side by side: summary metrics, the config entries whose values differ, every epoch row."""
    if len(refs) < 2:
        raise FastclassError("compare needs at least two runs")
    shown = [show_run(session, ref) for ref in refs]
    ids = [data["id"] for data in shown]
    if len(set(ids)) < len(ids):
        raise FastclassError("compare needs distinct runs (one was named twice)")
    keys = sorted({k for data in shown for k in data["config"]} - NOT_COMPARED)
    differences = {}
    for key in keys:
        values = [data["config"].get(key) for data in shown]
        if any(v != values[0] for v in values[1:]):
            differences[key] = values
    for key in ("arch", "snapshot", "device"):
        values = [data[key] for data in shown]
        if any(v != values[0] for v in values[1:]):
            differences[key] = values
    metrics = ("status", "epochs", "valid_loss", "accuracy", "tta_accuracy", "seconds")
    return {"runs": ids, "metrics": {m: [data[m] for data in shown] for m in metrics},
            "differences": dict(sorted(differences.items())),
            "epoch_rows": {data["id"]: data["epoch_rows"] for data in shown}}
