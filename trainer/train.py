"""`fastclass train`: fine-tune a CNN on a snapshot with the seeds' recipe, recording the run as it goes.

The recipe is fastai's fine_tune made explicit: `freeze_epochs` with only the new head training, then
`epochs` with the whole network unfrozen and discriminative learning rates (slice(lr / lr_mult, lr)),
then, for each further size of `sizes`, the same again on bigger images starting from those weights
(progressive resizing). Every epoch row is committed as the epoch ends, with a checkpoint (model and
optimizer) that `train --resume` continues from, and the best weights by valid loss (`--save best`), which
are what is exported when the run ends.
"""
from __future__ import annotations

import json
import logging
import math
import os
import pickle
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from sqlalchemy.orm import Session

from db.models import RunStatus, Snapshot
from fastclass.catalog import find_run
from fastclass.errors import FastclassError
from fastclass.store import Store
from trainer.archs import NO_WEIGHTS, PRETRAINED, build_body, get_arch
from trainer.data import build_dataloaders, presize_cache, presize_for, snapshot_data
from trainer.distributed import data_parallel, process_group, rank0_first
from trainer.plots import plot_curves, save_lr_find
from trainer.runs import (
    CURVES_NAME,
    EXPORT_NAME,
    LR_FIND_NAME,
    EpochRow,
    finish_run,
    record_epoch,
    reopen_run,
    shown_status,
    start_run,
    write_config,
)

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
CACHE_DIR = "cache"  # beside runs/: presized images, keyed by snapshot digest and presize; safe to delete
MODELS_DIR = "models"  # in the run folder while it trains: the checkpoint and the best weights so far
CHECKPOINT_NAME = "checkpoint.pth"
"""Weights, optimizer state, the Checkpoint state and the epoch's row: one file, replaced whole per epoch."""
BEST_NAME = "best-{epoch}.pth"
SAVE_CHOICES = ("best", "last")


@dataclass
class TrainConfig:
    """What the user asked for; `resolve` adds what was decided (device, workers, lr found, ...)."""

    snapshot: str
    arch: str = "resnet34"
    weights: str = PRETRAINED
    epochs: int = 4
    freeze_epochs: int | None = None
    """Epochs training only the new head: 1 on pretrained weights, 0 on random ones (None: that default)."""
    lr: float | None = 2e-3
    lr_mult: float = 100.0
    fp16: bool | None = None
    sizes: tuple[int, ...] = (224,)
    presize: int | None = None
    halve_bs: bool = False
    flip: bool = True
    bs: int = 64
    workers: int | None = None
    tta: bool = False
    seed: int = 42
    device: str = "auto"
    cache: bool | None = None
    save: str = "best"
    """Which epoch's weights are exported: the lowest valid loss (best) or the last."""
    early_stop: int | None = None
    """Stop after this many epochs without a lower valid loss (None: never)."""
    folds: int = 0
    """After the run, train this many fold models for out-of-fold losses (trainer/folds.py; 0: none)."""

    def __post_init__(self) -> None:
        if self.freeze_epochs is None:
            self.freeze_epochs = 0 if self.weights == NO_WEIGHTS else 1

    def check(self, processes: int = 1) -> None:
        """Refuse what cannot work, before anything is loaded (`processes`: the size of a multi-process run)."""
        if self.weights == NO_WEIGHTS and self.freeze_epochs:
            raise FastclassError("--freeze-epochs trains only the new head on top of pretrained weights; with "
                                 "--no-pretrained the whole network starts random, so there is no frozen phase "
                                 "(drop --freeze-epochs)")
        if self.halve_bs and len(self.sizes) < 2:
            raise FastclassError("--halve-bs halves the batch size at each further size of --sizes; give --sizes "
                                 "with two sizes or more")
        if self.save not in SAVE_CHOICES:
            raise FastclassError(f"--save {self.save!r}: use best or last")
        if self.early_stop is not None and self.early_stop < 1:
            raise FastclassError("--early-stop must be at least 1 epoch")
        if processes > 1 and self.lr is None:
            raise FastclassError("--lr auto runs lr_find in one process: find the rate with a one-process run "
                                 "(or give --lr) and train with several processes after")
        if self.epochs < 0 or self.freeze_epochs < 0 or self.epochs + self.freeze_epochs == 0:
            raise FastclassError("--epochs and --freeze-epochs cannot be negative, and at least one must be above 0")
        if not self.sizes or any(s < 8 for s in self.sizes):
            raise FastclassError("--size/--sizes must be image sizes of at least 8 pixels")
        if self.presize is not None and self.presize < max(self.sizes[:1]):
            raise FastclassError(f"--presize {self.presize} is smaller than --size {self.sizes[0]}")
        if self.lr is not None and not (0 < self.lr < 10):
            raise FastclassError(f"--lr {self.lr} is not a learning rate (a number above 0, or auto)")
        if self.lr_mult < 1:
            raise FastclassError("--lr-mult must be at least 1 (the body learns lr/lr_mult, the head lr)")
        if self.bs < 1:
            raise FastclassError("--bs must be at least 1")
        if self.folds == 1 or self.folds < 0:
            raise FastclassError("--folds must be at least 2 (or 0: no fold models)")
        if self.folds and processes > 1:
            raise FastclassError("--folds trains its fold models in one process: train without --nproc")


@dataclass
class TrainResult:
    run_id: int | None
    snapshot: str
    arch: str
    artifact_dir: Path
    device: str
    weights: str
    lr: float
    lr_found: bool
    train_images: int
    valid_images: int
    labels: list[str]
    epochs: list[EpochRow] = field(default_factory=list)
    valid_loss: float | None = None
    accuracy: float | None = None
    tta_accuracy: float | None = None
    exported_epoch: int | None = None
    """The epoch whose weights were exported (and whose metrics are the run's): see --save."""
    stopped_early: bool = False
    fold_losses: int = 0
    """Images given an out-of-fold loss (--folds)."""
    seconds: float = 0.0

    def as_dict(self) -> dict:
        data = asdict(self)
        data["artifact_dir"] = str(self.artifact_dir)
        return data


def resolve_device(name: str):
    """The torch device; under a multi-process launch each process takes the GPU of its LOCAL_RANK."""
    import torch

    if name not in DEVICES:
        raise FastclassError(f"unknown --device {name!r}; use one of: {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise FastclassError("--device cuda, but torch sees no CUDA GPU (torch.cuda.is_available() is False); "
                             "use --device cpu or auto")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device


def _finite(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass
class BatchProgress:
    """Where an epoch is: its batches done of total (training, then validation) and the running loss."""

    epoch: int
    total_epochs: int
    phase: str
    size: int
    done: int
    total: int
    stage: str
    loss: float | None


@dataclass
class Phase:
    """One fit_one_cycle of the recipe: frozen or unfrozen, at one size and batch size."""

    name: str
    size: int
    bs: int
    epochs: int
    lr: object
    pct_start: float


def plan_phases(config: TrainConfig, lr: float) -> list[Phase]:
    """The recipe as phases: the frozen head, then the whole network at each size (lr halved after the
    frozen phase, the batch size halved per further size with --halve-bs)."""
    phases = []
    if config.freeze_epochs:
        phases.append(Phase("frozen", config.sizes[0], config.bs, config.freeze_epochs, lr, 0.99))
        lr /= 2
    bs = config.bs
    for index, size in enumerate(config.sizes):
        if index and config.halve_bs:
            bs = max(1, bs // 2)
        if config.epochs:
            phases.append(Phase("unfrozen", size, bs, config.epochs, slice(lr / config.lr_mult, lr), 0.3))
    return phases


@dataclass
class Checkpoint:
    """What `train --resume` continues from: the epochs completed, and the best and early-stop state then."""

    epochs: int = 0
    best_epoch: int | None = None
    best_loss: float | None = None
    since_best: int = 0


class _Tracker:
    """What the epoch callback needs across phases: the run, the rows, the best epoch and the hooks."""

    def __init__(self, session: Session, run, config: TrainConfig, hooks: "TrainHooks", world: int,
                 rows: list[EpochRow] | None = None, state: Checkpoint | None = None) -> None:
        self.session, self.run, self.config, self.hooks, self.world = session, run, config, hooks, world
        self.total_epochs = config.freeze_epochs + config.epochs * len(config.sizes)
        self.rows: list[EpochRow] = list(rows or [])
        self.state = state or Checkpoint()
        self.stopped_early = False

    @property
    def models(self) -> Path | None:
        return Path(self.run.artifact_dir) / MODELS_DIR if self.run is not None else None

    def add(self, learn, row: EpochRow) -> None:
        """Record the epoch, keep the best weights and the checkpoint; may stop the run (--early-stop)."""
        from fastai.callback.core import CancelFitException

        improved = row.valid_loss is not None and (self.state.best_loss is None
                                                     or row.valid_loss < self.state.best_loss)
        if improved:
            self.state.best_epoch, self.state.best_loss, self.state.since_best = row.epoch, row.valid_loss, 0
        else:
            self.state.since_best += 1
        self.state.epochs = row.epoch + 1
        # Only the first process of a multi-process run records and writes; the others train their share.
        if self.run is not None:
            # In this order a kill at any point leaves a checkpoint that agrees with the best weights it names,
            # and epoch rows that are the checkpoint's or fewer (resume_run adds the checkpoint's last row).
            if improved and self.config.save == "best":
                _save_atomic(self.models / BEST_NAME.format(epoch=row.epoch), {"model": _model_state(learn)})
            _save_atomic(self.models / CHECKPOINT_NAME, {
                "model": _model_state(learn), "opt": _plain(learn.opt.state_dict()), "state": asdict(self.state),
                "row": asdict(row)})
            for old in self.models.glob(BEST_NAME.format(epoch="*")):
                if old.name != BEST_NAME.format(epoch=self.state.best_epoch):
                    old.unlink()
            record_epoch(self.session, self.run, row)
            plot_curves(self.rows + [row], Path(self.run.artifact_dir) / CURVES_NAME,
                        f"run {self.run.id}: {self.run.arch}", self.state.best_epoch if self.config.save == "best"
                        else None)
        self.rows.append(row)
        if self.hooks.on_epoch is not None:
            self.hooks.on_epoch(row)
        if self.config.early_stop and self.state.since_best >= self.config.early_stop \
                and self.state.epochs < self.total_epochs:
            self.stopped_early = True
            raise CancelFitException()


def _model_state(learn) -> dict:
    from fastai.torch_core import get_model

    return get_model(learn.model).state_dict()


def _plain(value):
    """fastai's optimizer state with its L lists and numpy numbers made plain, so that the checkpoint loads
    with torch.load(weights_only=True): tensors, numbers, strings, lists and dicts only."""
    import numpy as np

    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "L":
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _save_atomic(path: Path, data: dict) -> None:
    """torch.save written beside and renamed: a kill mid-write leaves the previous file whole."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(data, partial)
    os.replace(partial, path)


def read_checkpoint(path: Path) -> dict | None:
    """A run's checkpoint (weights, optimizer, state, last row), or None when there is none to read."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):
        return None


def _epoch_callback(tracker: _Tracker, phase: str, size: int):
    from fastai.callback.core import Callback
    from fastai.learner import Recorder
    from fastai.torch_core import find_bs

    class EpochRecorder(Callback):
        # After the Recorder, which has computed the epoch's losses and metrics by then; before fastai's
        # SkipToEpoch (order 70), which cancels the epochs a resumed run already has.
        order = Recorder.order + 1

        def before_epoch(self) -> None:
            self.started = time.monotonic()
            self.images, self.train_seconds, self.trained = 0, 0.0, False
            self.train_batches = len(self.dls.train)
            self.total = self.train_batches + len(self.dls.valid)

        def before_train(self) -> None:
            self.train_started = time.monotonic()
            self.trained = True

        def after_batch(self) -> None:
            if self.training:
                self.images += find_bs(self.yb)
            if tracker.hooks.on_batch is not None:
                done = self.iter + 1 + (0 if self.training else self.train_batches)
                loss = getattr(self.recorder, "smooth_loss", None)
                tracker.hooks.on_batch(BatchProgress(
                    len(tracker.rows), tracker.total_epochs, phase, size, done, self.total,
                    "train" if self.training else "valid", _finite(loss.value) if loss is not None else None))

        def after_train(self) -> None:
            self.train_seconds = time.monotonic() - self.train_started

        def after_epoch(self) -> None:
            if not self.trained:
                return
            train_loss, valid_loss, error, acc = (list(self.recorder.values[-1]) + [math.nan] * 4)[:4]
            tracker.add(self.learn, EpochRow(
                len(tracker.rows), phase, size, _finite(train_loss), _finite(valid_loss), _finite(error),
                _finite(acc), round(time.monotonic() - self.started, 3),
                round(tracker.world * self.images / max(self.train_seconds, 1e-9), 1)))

    return EpochRecorder()


@dataclass
class TrainHooks:
    """How a caller follows a run: preparation stages (with a count where one exists), the run starting,
    lr_find's pick, every batch, each epoch's row."""

    progress: Callable[[int, int, str], None] | None = None
    on_stage: Callable[[str], None] | None = None
    on_start: Callable[[TrainResult], None] | None = None
    on_lr: Callable[[float], None] | None = None
    on_batch: Callable[[BatchProgress], None] | None = None
    on_epoch: Callable[[EpochRow], None] | None = None

    def stage(self, text: str) -> None:
        if self.on_stage is not None:
            self.on_stage(text)


def train_snapshot(session: Session, store: Store, config: TrainConfig, runs_root: Path,
                   hooks: TrainHooks | None = None) -> TrainResult:
    """Train on a snapshot and record the run; returns the final metrics and where the artifacts are.

    Everything that can be refused (unknown snapshot or arch, missing files, unreachable weights, no GPU)
    is checked before a run row exists or any data is loaded.
    """
    return _train(session, store, config, runs_root, hooks or TrainHooks())


def resume_run(session: Session, store: Store, run_ref: str, runs_root: Path, hooks: TrainHooks | None = None,
               device: str | None = None, workers: int | None = None) -> TrainResult:
    """Continue an interrupted (or killed, or failed) run from its last completed epoch, with the options
    it was started with: its epoch rows are kept and the next ones appended to the same run."""
    run = find_run(session, run_ref)
    status = shown_status(run)
    if status == RunStatus.DONE.value:
        raise FastclassError(f"run {run.id} finished; there is nothing to resume (train a new run instead)")
    if status == RunStatus.RUNNING.value:
        raise FastclassError(f"run {run.id} is still running (process {run.pid} on {run.host})")
    checkpoint = read_checkpoint(Path(run.artifact_dir) / MODELS_DIR / CHECKPOINT_NAME)
    if checkpoint is None:
        raise FastclassError(f"run {run.id} has no checkpoint to resume from (it stopped before its first epoch "
                             "ended, or its folder was cleaned); train a new run instead")
    resolved = json.loads(run.config)
    config = config_from_record(resolved, device, workers)
    snapshot = session.get(Snapshot, run.snapshot_id)
    if snapshot.name != config.snapshot:
        raise FastclassError(f"run {run.id} was trained on snapshot {snapshot.name!r}, not {config.snapshot!r}")
    return _train(session, store, config, runs_root, hooks or TrainHooks(), resume=(run, checkpoint, resolved))


def config_from_record(resolved: dict, device: str | None = None, workers: int | None = None) -> TrainConfig:
    """The TrainConfig a recorded run was started with (its lr_find pick as its lr)."""
    names = {f for f in TrainConfig.__dataclass_fields__}
    values = {k: v for k, v in resolved.items() if k in names}
    values["sizes"] = tuple(values["sizes"])
    if values.get("lr") is None:
        values["lr"] = resolved.get("lr_found")
    values["device"] = device or "auto"
    values["workers"] = workers
    return TrainConfig(**values)


def _train(session: Session, store: Store, config: TrainConfig, runs_root: Path, hooks: TrainHooks,
           resume: tuple | None = None) -> TrainResult:
    device = resolve_device(config.device)
    cuda = device.type == "cuda"
    rank, world = process_group(cpu=not cuda)
    config.check(world)
    if resume is not None and world > 1:
        raise FastclassError("train --resume runs in one process (without --nproc)")
    hooks.stage(f"reading snapshot {config.snapshot}")
    data = snapshot_data(session, store, config.snapshot)
    if config.folds:
        from trainer.folds import check_folds

        check_folds(data, config.folds)
    spec = get_arch(config.arch)
    fp16 = cuda if config.fp16 is None else config.fp16
    if fp16 and not cuda:
        raise FastclassError("--fp16 needs a CUDA GPU; on the CPU train with --no-fp16 (the default there)")
    workers = config.workers if config.workers is not None else (min(os.cpu_count() or 1, 16) if cuda else 0)
    # On a GPU the loader is the bottleneck, so images are presized once; on the CPU the model is.
    cached = cuda if config.cache is None else config.cache

    import torch
    from fastai.torch_core import get_model, set_seed

    set_seed(config.seed, reproducible=True)
    hooks.stage(f"loading {spec.name} weights ({config.weights})" if config.weights != NO_WEIGHTS
                else f"building {spec.name} with random weights")
    body = build_body(spec, config.weights)
    device_name = _device_name(device) + (f" x {world} processes" if world > 1 else "")
    if resume is None:
        resolved = {**asdict(config), "sizes": list(config.sizes), "device": str(device), "fp16": fp16,
                    "workers": workers, "cache": cached, "weights_loaded": body.weights, "stats": list(spec.stats),
                    "labels": data.vocab, "presizes": [presize_for(s, config.presize) for s in config.sizes],
                    "train_images": data.train_count, "valid_images": data.valid_count, "processes": world}
        run = start_run(session, data.snapshot_id, spec.name, resolved, device_name, runs_root) if rank == 0 else None
        rows, state = [], Checkpoint()
    else:
        run, checkpoint, resolved = resume
        if data.vocab != resolved["labels"]:
            raise FastclassError(f"snapshot {config.snapshot!r} no longer has run {run.id}'s labels")
        state = Checkpoint(**checkpoint["state"])
        rows = reopen_run(session, run, EpochRow(**checkpoint["row"]), device_name)
    started = time.monotonic()
    result = TrainResult(run.id if run else None, config.snapshot, spec.name,
                         Path(run.artifact_dir if run else runs_root), device_name, body.weights, config.lr or 0.0,
                         config.lr is None, data.train_count, data.valid_count, data.vocab)
    if hooks.on_start is not None:
        hooks.on_start(result)
    tracker = _Tracker(session, run, config, hooks, world, rows, state)

    def dataloaders(size: int, bs: int, from_cache: bool = cached, source=data):
        cache = None
        if from_cache:
            hooks.stage(f"presizing images into the cache ({presize_for(size, config.presize)} px)")
            cache = rank0_first(world, rank, lambda: presize_cache(data, presize_for(size, config.presize),
                                                                    runs_root.parent / CACHE_DIR,
                                                                    progress=hooks.progress))
        hooks.stage(f"data loaders at {size} px ({source.train_count} train / {source.valid_count} valid images)")
        return build_dataloaders(source, size, config.presize, bs, workers, config.flip, spec.stats, device, cache)

    try:
        learn = _learner(dataloaders(config.sizes[0], config.bs), data, spec, body, result.artifact_dir, device)
        if fp16:
            learn.to_fp16()
        learn.freeze()
        if resume is not None:
            get_model(learn.model).load_state_dict(checkpoint["model"])
            from fastcore.foundation import L

            learn.opt.load_state_dict({"state": checkpoint["opt"]["state"], "hypers": L(checkpoint["opt"]["hypers"])})
        elif config.lr is None:
            hooks.stage("lr_find: trying learning rates on a few batches")
            result.lr = float(learn.lr_find(show_plot=False).valley)
            if run is not None:
                save_lr_find(learn.recorder, result.lr, Path(run.artifact_dir) / LR_FIND_NAME)
            if hooks.on_lr is not None:
                hooks.on_lr(result.lr)
            resolved["lr_found"] = result.lr
            if run is not None:
                write_config(run, resolved)
                session.commit()
        _fit_phases(learn, plan_phases(config, result.lr), tracker, dataloaders, distributed=world > 1, cuda=cuda)
        result.epochs = tracker.rows
        exported = _exported_row(config, tracker)
        result.valid_loss, result.accuracy = exported.valid_loss, exported.accuracy
        result.exported_epoch, result.stopped_early = exported.epoch, tracker.stopped_early
        if rank == 0:
            if exported is not tracker.rows[-1]:
                best = torch.load(tracker.models / BEST_NAME.format(epoch=exported.epoch), map_location=device,
                                  weights_only=True)
                get_model(learn.model).load_state_dict(best["model"])
            if config.tta:
                preds, targets = learn.tta(dl=learn.dls.valid)
                result.tta_accuracy = float((preds.argmax(dim=1) == targets).float().mean())
            learn.to_fp32()
            if cached or exported.size != tracker.rows[-1].size:
                # The exported model reads files (predict, interpret), not this run's cache, at its own size.
                learn.dls = dataloaders(exported.size, config.bs, from_cache=False)
            # Written beside, then renamed: a kill during the write never leaves a truncated export.pkl.
            learn.export(EXPORT_NAME + ".partial")
            os.replace(Path(learn.path) / (EXPORT_NAME + ".partial"), Path(learn.path) / EXPORT_NAME)
            resolved.update({"exported_epoch": exported.epoch, "stopped_early": tracker.stopped_early})
            write_config(run, resolved)
            plot_curves(tracker.rows, Path(run.artifact_dir) / CURVES_NAME, f"run {run.id}: {run.arch}",
                        exported.epoch)
    except KeyboardInterrupt:
        if run is not None:
            finish_run(session, run.id, RunStatus.INTERRUPTED, error="interrupted (Ctrl-C)")
        raise
    except BaseException as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if run is not None:
            finish_run(session, run.id, RunStatus.FAILED, error=f"{type(exc).__name__}: {first}"[:1000])
        raise
    result.seconds = round(time.monotonic() - started, 1)
    if run is not None:
        finish_run(session, run.id, RunStatus.DONE, valid_loss=result.valid_loss, accuracy=result.accuracy,
                   tta_accuracy=result.tta_accuracy)
        # The checkpoints only serve an unfinished run; the export is the model now.
        shutil.rmtree(tracker.models, ignore_errors=True)
        if config.folds:
            result.fold_losses = _fold_losses(session, run.id, config, data, spec, result, dataloaders, fp16, device,
                                              hooks)
            result.seconds = round(time.monotonic() - started, 1)
    return result


def _fold_losses(session: Session, run_id: int, config: TrainConfig, data, spec, result: TrainResult, dataloaders,
                 fp16: bool, device, hooks: TrainHooks) -> int:
    """The run's recipe once per fold (trainer/folds.py): fresh weights, the run's learning rate, every
    phase to its end (no early stop: there is no held-out set to stop on but the fold itself)."""
    from fastai.torch_core import set_seed

    from trainer.folds import record_fold_losses

    def train_fold(k: int, fold_data):
        set_seed(config.seed + k + 1, reproducible=True)
        body = build_body(spec, config.weights)
        phases = plan_phases(config, result.lr)
        learn = _learner(dataloaders(phases[0].size, phases[0].bs, source=fold_data), fold_data, spec, body,
                         result.artifact_dir, device)
        if fp16:
            learn.to_fp16()
        learn.freeze()
        _fit_phases(learn, phases, None, lambda size, bs: dataloaders(size, bs, source=fold_data), distributed=False,
                    cuda=device.type == "cuda")
        learn.to_fp32()
        return learn

    return record_fold_losses(session, run_id, data, config.folds, config.seed, train_fold, hooks.stage)


def _exported_row(config: TrainConfig, tracker: _Tracker) -> EpochRow:
    if config.save == "best" and tracker.state.best_epoch is not None:
        return next(r for r in tracker.rows if r.epoch == tracker.state.best_epoch)
    return tracker.rows[-1]


def _fit_phases(learn, phases: list[Phase], tracker: _Tracker | None, dataloaders, distributed: bool,
                cuda: bool) -> None:
    """Each phase in turn; the epochs a resumed run completed are skipped (fastai's start_epoch keeps the
    one-cycle schedule where it was). Without a tracker (a fold model) nothing is recorded and every phase
    runs to its end."""
    import contextlib

    done = tracker.state.epochs if tracker is not None else 0
    current = (phases[0].size, phases[0].bs) if phases else None
    with data_parallel(learn, cuda) if distributed else contextlib.nullcontext():
        for phase in phases:
            if phase.name == "unfrozen":
                learn.unfreeze()
            if done >= phase.epochs:
                done -= phase.epochs
                continue
            if (phase.size, phase.bs) != current:
                learn.dls = dataloaders(phase.size, phase.bs)
                current = (phase.size, phase.bs)
            learn.fit_one_cycle(phase.epochs, phase.lr, pct_start=phase.pct_start, start_epoch=done,
                                cbs=[_epoch_callback(tracker, phase.name, phase.size)] if tracker is not None else [])
            done = 0
            if tracker is not None and tracker.stopped_early:
                break


def _learner(dls, data, spec, body, path: str, device):
    import torch
    from fastai.callback.progress import ProgressCallback
    from fastai.learner import Learner
    from fastai.metrics import accuracy, error_rate
    from fastai.vision.learner import add_head, default_split
    from fastcore.basics import noop

    model = add_head(body.module, body.features, len(data.vocab), pool=body.needs_pool)
    learn = Learner(dls, model, splitter=spec.split or default_split, metrics=[error_rate, accuracy], path=Path(path))
    # Progress and the epoch table are the caller's (through callbacks); fastai itself stays silent.
    learn.remove_cb(ProgressCallback)
    learn.logger = noop
    if device.type == "cuda":
        learn.model = learn.model.to(memory_format=torch.channels_last)
    return learn


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"cpu: {os.cpu_count()} cores, torch {torch.__version__}"
