"""`fastclass train`: fine-tune a CNN on a snapshot with the seeds' recipe, recording the run as it goes.

The recipe is fastai's fine_tune made explicit: `freeze_epochs` with only the new head training, then
`epochs` with the whole network unfrozen and discriminative learning rates (slice(lr / lr_mult, lr)),
then, for each further size of `sizes`, the same again on bigger images starting from those weights
(progressive resizing). Every epoch row is committed as the epoch ends.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from sqlalchemy.orm import Session

from db.models import RunStatus
from fastclass.errors import FastclassError
from fastclass.store import Store
from trainer.archs import PRETRAINED, build_body, get_arch
from trainer.data import build_dataloaders, presize_cache, presize_for, snapshot_data
from trainer.distributed import data_parallel, process_group, rank0_first
from trainer.runs import EXPORT_NAME, EpochRow, finish_run, record_epoch, start_run, write_config

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
CACHE_DIR = "cache"  # beside runs/: presized images, keyed by snapshot digest and presize; safe to delete
PROGRESS_STEPS = 1000  # progress units per epoch, so the bar moves within an epoch


@dataclass
class TrainConfig:
    """What the user asked for; `resolve` adds what was decided (device, workers, lr found, ...)."""

    snapshot: str
    arch: str = "resnet34"
    weights: str = PRETRAINED
    epochs: int = 4
    freeze_epochs: int = 1
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

    def check(self, processes: int = 1) -> None:
        """Refuse what cannot work, before anything is loaded (`processes`: the size of a multi-process run)."""
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


class _Tracker:
    """What the epoch callback needs across phases: the run, counters, and the caller's callbacks."""

    def __init__(self, session: Session, run, total_epochs: int, progress, on_epoch, world: int) -> None:
        self.session, self.run, self.total_epochs = session, run, total_epochs
        self.progress, self.on_epoch, self.world = progress, on_epoch, world
        self.rows: list[EpochRow] = []

    def report(self, fraction: float, detail: str) -> None:
        if self.progress is not None:
            done = len(self.rows) * PROGRESS_STEPS + int(fraction * PROGRESS_STEPS)
            self.progress(min(done, self.total_epochs * PROGRESS_STEPS), self.total_epochs * PROGRESS_STEPS, detail)

    def add(self, row: EpochRow) -> None:
        # Only the first process of a multi-process run records; the others train their share in silence.
        if self.run is not None:
            record_epoch(self.session, self.run, row)
        self.rows.append(row)
        if self.on_epoch is not None:
            self.on_epoch(row)


def _epoch_callback(tracker: _Tracker, phase: str, size: int):
    from fastai.callback.core import Callback
    from fastai.learner import Recorder
    from fastai.torch_core import find_bs

    class EpochRecorder(Callback):
        # After the Recorder, which has computed the epoch's losses and metrics by then.
        order = Recorder.order + 1

        def before_epoch(self) -> None:
            self.started = time.monotonic()
            self.images, self.train_seconds = 0, 0.0

        def before_train(self) -> None:
            self.train_started = time.monotonic()

        def after_batch(self) -> None:
            if self.training:
                self.images += find_bs(self.yb)
                tracker.report(self.iter / max(1, self.n_iter),
                               f"epoch {len(tracker.rows) + 1}/{tracker.total_epochs} {phase} {size}px")

        def after_train(self) -> None:
            self.train_seconds = time.monotonic() - self.train_started

        def after_epoch(self) -> None:
            train_loss, valid_loss, error, acc = (list(self.recorder.values[-1]) + [math.nan] * 4)[:4]
            tracker.add(EpochRow(len(tracker.rows), phase, size, _finite(train_loss), _finite(valid_loss),
                                 _finite(error), _finite(acc), round(time.monotonic() - self.started, 3),
                                 round(tracker.world * self.images / max(self.train_seconds, 1e-9), 1)))

    return EpochRecorder()


@dataclass
class TrainHooks:
    """How a caller follows a run: a progress bar, the run starting, lr_find's pick, each epoch's row."""

    progress: Callable[[int, int, str], None] | None = None
    on_start: Callable[[TrainResult], None] | None = None
    on_lr: Callable[[float], None] | None = None
    on_epoch: Callable[[EpochRow], None] | None = None


def train_snapshot(session: Session, store: Store, config: TrainConfig, runs_root: Path,
                   hooks: TrainHooks | None = None) -> TrainResult:
    """Train on a snapshot and record the run; returns the final metrics and where the artifacts are.

    Everything that can be refused (unknown snapshot or arch, missing files, unreachable weights, no GPU)
    is checked before a run row exists or any data is loaded.
    """
    device = resolve_device(config.device)
    cuda = device.type == "cuda"
    rank, world = process_group(cpu=not cuda)
    config.check(world)
    data = snapshot_data(session, store, config.snapshot)
    spec = get_arch(config.arch)
    fp16 = cuda if config.fp16 is None else config.fp16
    if fp16 and not cuda:
        raise FastclassError("--fp16 needs a CUDA GPU; on the CPU train with --no-fp16 (the default there)")
    workers = config.workers if config.workers is not None else (min(os.cpu_count() or 1, 16) if cuda else 0)
    # On a GPU the loader is the bottleneck, so images are presized once; on the CPU the model is.
    cached = cuda if config.cache is None else config.cache

    from fastai.torch_core import set_seed

    set_seed(config.seed, reproducible=True)
    body = build_body(spec, config.weights)
    resolved = {**asdict(config), "sizes": list(config.sizes), "device": str(device), "fp16": fp16,
                "workers": workers, "cache": cached, "weights_loaded": body.weights, "stats": list(spec.stats), "labels": data.vocab,
                "presizes": [presize_for(s, config.presize) for s in config.sizes],
                "train_images": data.train_count, "valid_images": data.valid_count, "processes": world}
    device_name = _device_name(device) + (f" x {world} processes" if world > 1 else "")
    run = start_run(session, data.snapshot_id, spec.name, resolved, device_name, runs_root) if rank == 0 else None
    started = time.monotonic()
    result = TrainResult(run.id if run else None, config.snapshot, spec.name,
                         Path(run.artifact_dir if run else runs_root), device_name, body.weights, config.lr or 0.0,
                         config.lr is None, data.train_count, data.valid_count, data.vocab)
    hooks = hooks or TrainHooks()
    if hooks.on_start is not None:
        hooks.on_start(result)
    total_epochs = config.freeze_epochs + config.epochs * len(config.sizes)
    tracker = _Tracker(session, run, total_epochs, hooks.progress, hooks.on_epoch, world)

    def dataloaders(size: int, bs: int, from_cache: bool = cached):
        cache = None
        if from_cache:
            cache = rank0_first(world, rank, lambda: presize_cache(data, presize_for(size, config.presize),
                                                                    runs_root.parent / CACHE_DIR))
        return build_dataloaders(data, size, config.presize, bs, workers, config.flip, spec.stats, device, cache)

    try:
        learn = _learner(dataloaders(config.sizes[0], config.bs), data, spec, body, result.artifact_dir, device)
        if fp16:
            learn.to_fp16()
        learn.freeze()
        if config.lr is None:
            result.lr = float(learn.lr_find(show_plot=False).valley)
            if hooks.on_lr is not None:
                hooks.on_lr(result.lr)
            resolved["lr_found"] = result.lr
            write_config(run, resolved)
            session.commit()
        bs = _fit_phases(learn, config, result.lr, tracker, dataloaders, distributed=world > 1, cuda=cuda)
        result.epochs = tracker.rows
        last = tracker.rows[-1]
        result.valid_loss, result.accuracy = last.valid_loss, last.accuracy
        if rank == 0:
            if config.tta:
                preds, targets = learn.tta(dl=learn.dls.valid)
                result.tta_accuracy = float((preds.argmax(dim=1) == targets).float().mean())
            learn.to_fp32()
            if cached:
                # The exported model must read files (predict, interpret), not this run's cache.
                learn.dls = dataloaders(config.sizes[-1], bs, from_cache=False)
            # Written beside, then renamed: a kill during the write never leaves a truncated export.pkl.
            learn.export(EXPORT_NAME + ".partial")
            os.replace(Path(learn.path) / (EXPORT_NAME + ".partial"), Path(learn.path) / EXPORT_NAME)
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
    return result


def _fit_phases(learn, config: TrainConfig, lr: float, tracker: _Tracker, dataloaders, distributed: bool,
                cuda: bool) -> int:
    """The frozen phase, then the unfrozen phase at each size; returns the last batch size."""
    import contextlib

    with data_parallel(learn, cuda) if distributed else contextlib.nullcontext():
        if config.freeze_epochs:
            learn.fit_one_cycle(config.freeze_epochs, lr, pct_start=0.99,
                                cbs=[_epoch_callback(tracker, "frozen", config.sizes[0])])
            lr /= 2
        learn.unfreeze()
        bs = config.bs
        for index, size in enumerate(config.sizes):
            if index:
                bs = max(1, bs // 2) if config.halve_bs else bs
                learn.dls = dataloaders(size, bs)
            if config.epochs:
                learn.fit_one_cycle(config.epochs, slice(lr / config.lr_mult, lr), pct_start=0.3,
                                    cbs=[_epoch_callback(tracker, "unfrozen", size)])
    return bs


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
