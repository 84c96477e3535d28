"""Training and using models: `train`, `runs`, `interpret`, `predict`."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from fastclass.cli import COUNT, SEED, Options, cli, echo_json, json_option, log, pass_options


def _runs_root(catalog) -> Path:
    return catalog.work_dir / "runs"


def _parse_sizes(size: int, sizes: str | None) -> tuple[int, ...]:
    if sizes is None:
        return (size,)
    try:
        parsed = tuple(int(part) for part in sizes.split(",") if part.strip())
    except ValueError:
        parsed = ()
    if not parsed:
        raise click.BadParameter(f"{sizes!r} is not a list of sizes such as 224,448", param_hint="--sizes")
    return parsed


def _parse_lr(text: str) -> float | None:
    if text.strip().lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is neither a number nor auto", param_hint="--lr") from None


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


EPOCH_HEADER = (f"{'epoch':>5s} {'phase':9s} {'size':>5s} {'train_loss':>10s} {'valid_loss':>10s} "
                f"{'error_rate':>10s} {'accuracy':>8s} {'time':>8s} {'img/s':>8s}")


def _epoch_line(row) -> str:
    return (f"{row.epoch:5d} {row.phase:9s} {row.size:5d} {_fmt(row.train_loss, 6):>10s} {_fmt(row.valid_loss, 6):>10s} "
            f"{_fmt(row.error_rate, 6):>10s} {_fmt(row.accuracy, 4):>8s} {row.seconds:7.1f}s {row.images_per_s:8.1f}")


class TrainDisplay:
    """What a person sees while a run trains. On a terminal: a line per preparation stage, a bar per epoch
    over its batches (ETA, running loss, the run's time left) that is cleared when the epoch's table row is
    printed. Piped: the stage lines and the table rows only. With -q or --json: nothing until the end."""

    def __init__(self, talk: bool, tty: bool) -> None:
        self.talk, self.tty = talk, tty
        self.bar = None
        self.epoch_seconds: list[float] = []
        self.run_id: int | None = None

    def stage(self, text: str) -> None:
        if self.talk:
            self.close()
            click.echo(f"  preparing: {text}", err=True)

    def count(self, done: int, total: int, detail: str) -> None:
        """A preparation step with a count (the presize cache)."""
        if not (self.talk and self.tty):
            return
        bar = self._bar(("count", detail), total, detail, "image")
        bar.update(done - bar.n)

    def batch(self, step) -> None:
        if not (self.talk and self.tty):
            return
        desc = f"epoch {step.epoch + 1}/{step.total_epochs} {step.phase} {step.size}px"
        bar = self._bar(("epoch", step.epoch), step.total, desc, "batch")
        left = step.total_epochs - step.epoch - 1
        postfix = [step.stage]
        if step.loss is not None:
            postfix.append(f"loss {step.loss:.4f}")
        if left and self.epoch_seconds:
            postfix.append(f"run ~{_duration(left * sum(self.epoch_seconds) / len(self.epoch_seconds))} more")
        bar.set_postfix_str(", ".join(postfix), refresh=False)
        bar.update(step.done - bar.n)

    def epoch(self, row) -> None:
        self.epoch_seconds.append(row.seconds)
        if not self.talk:
            return
        self.close()
        if len(self.epoch_seconds) == 1:
            click.echo(EPOCH_HEADER)
        click.echo(_epoch_line(row))

    def _bar(self, key, total: int, desc: str, unit: str):
        from tqdm import tqdm

        if self.bar is not None and self.bar.key == key:
            return self.bar
        self.close()
        self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True,
                        mininterval=0.2)
        self.bar.key = key
        return self.bar

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# What `train --resume` may still choose: where and how fast, never what is trained.
RESUME_OPTIONS = {"resume_ref", "device", "workers", "as_json"}


@cli.command()
@click.option("--snapshot", "snapshot_name", metavar="NAME", help="The snapshot to train on.")
@click.option("--resume", "resume_ref", metavar="RUN",
              help="Continue an interrupted run from its last completed epoch, with its own options.")
@click.option("--arch", default="resnet34", show_default=True,
              help="Architecture: resnet18/34/50/101/152, densenet, efficientnet, convnext, ... or a timm model name.")
@click.option("--pretrained/--no-pretrained", default=True, show_default=True,
              help="Start from ImageNet weights (downloaded once into torch's cache) or from random ones.")
@click.option("--weights", "weights_file", type=click.Path(path_type=Path), metavar="FILE",
              help="Start from a local state_dict or checkpoint of --arch (for machines without network).")
@click.option("--epochs", type=click.IntRange(0, 100_000), default=4, show_default=True,
              help="Epochs with the whole network.")
@click.option("--freeze-epochs", type=click.IntRange(0, 100_000),
              help="First epochs training only the new head [default: 1; none with --no-pretrained].")
@click.option("--lr", "lr_text", default="2e-3", show_default=True, metavar="LR|auto",
              help="Peak learning rate, or auto for lr_find's suggestion (plotted in lr_find.png).")
@click.option("--lr-mult", type=float, default=100.0, show_default=True,
              help="The earliest layers learn at lr/lr-mult (discriminative learning rates).")
@click.option("--fp16/--no-fp16", default=None, help="Mixed precision [default: on with a GPU].")
@click.option("--size", type=click.IntRange(8), default=224, show_default=True, help="Training image size.")
@click.option("--sizes", metavar="S1,S2,...",
              help="Progressive resizing instead of --size, e.g. 224,448: --epochs more at each further size.")
@click.option("--halve-bs", is_flag=True, help="With --sizes: halve the batch size at each further size.")
@click.option("--presize", type=click.IntRange(8), help="Item resize before batch augmentation [default: 2.05 x size].")
@click.option("--no-flip", is_flag=True, help="No left-right flips (for classes where left and right matter).")
@click.option("--bs", type=click.IntRange(1), default=64, show_default=True, help="Batch size.")
@click.option("--workers", type=click.IntRange(0, 256), envvar="FASTCLASS_WORKERS",
              help="Data loading processes [env FASTCLASS_WORKERS; default: cores up to 16 on a GPU, 0 on the CPU].")
@click.option("--tta", is_flag=True, help="Also report test-time-augmentation accuracy on valid at the end.")
@click.option("--save", type=click.Choice(["best", "last"]), default="best", show_default=True,
              help="Export the epoch with the lowest valid loss, or the last one.")
@click.option("--early-stop", type=click.IntRange(1), metavar="N",
              help="Stop after N epochs without a lower valid loss.")
@click.option("--folds", type=click.IntRange(0), default=0, show_default=True, metavar="K",
              help="After the run, train K more models the same way, each without one fold of the snapshot, "
                   "so every image gets a loss from a model that never saw it (for `clean --order loss`).")
@click.option("--seed", type=SEED, default=42, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              envvar="FASTCLASS_DEVICE", help="Where to train [env FASTCLASS_DEVICE].")
@click.option("--cache/--no-cache", default=None,
              help="Decode and presize every image once into cache/ beside runs/ [default: on with a GPU].")
@click.option("--nproc", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Processes (one per GPU) for distributed data-parallel training, launched with torchrun.")
@json_option("result")
@click.pass_context
def train(ctx: click.Context, snapshot_name: str | None, resume_ref: str | None, arch: str, pretrained: bool,
          weights_file: Path | None, epochs: int, freeze_epochs: int | None, lr_text: str, lr_mult: float,
          fp16: bool | None, size: int, sizes: str | None, halve_bs: bool, presize: int | None, no_flip: bool, bs: int,
          workers: int | None, tta: bool, save: str, early_stop: int | None, folds: int, seed: int, device: str,
          cache: bool | None, nproc: int, as_json: bool) -> None:
    """Fine-tune a CNN on a snapshot; the run and every epoch are recorded in the catalog, with curves.png,
    a checkpoint per epoch (for --resume) and the exported model (see --save) in the run's folder."""
    opts = ctx.find_object(Options)
    given = {name for name in ctx.params
             if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)}
    if resume_ref is not None:
        extra = [param for param in ctx.command.params if param.name in given - RESUME_OPTIONS]
        if extra:
            names = ", ".join(sorted(p.secondary_opts[0] if p.secondary_opts and not ctx.params[p.name] else p.opts[0]
                                     for p in extra))
            raise click.UsageError(f"--resume continues run {resume_ref} with the options it was started with; "
                                   f"drop {names}")
    elif snapshot_name is None:
        raise click.UsageError("give --snapshot NAME (or --resume RUN to continue a run)")
    if weights_file is not None and not pretrained:
        raise click.UsageError("--weights and --no-pretrained contradict each other")
    if sizes is not None and "size" in given:
        raise click.UsageError("--size and --sizes contradict each other: give every size in --sizes")
    from trainer.archs import NO_WEIGHTS, PRETRAINED
    from trainer.train import TrainConfig, TrainHooks, resume_run, train_snapshot

    rank = int(os.environ.get("RANK", 0))
    # Under torchrun only the first process reports; the others train their share of each batch.
    display = TrainDisplay(not (as_json or opts.quiet) and rank == 0, sys.stderr.isatty())

    def on_start(result) -> None:
        display.run_id = result.run_id
        if display.talk:
            display.close()
            verb = "continues" if resume_ref else "trains"
            click.echo(f"Run {result.run_id} {verb} {result.arch} on snapshot {result.snapshot} ({result.train_images} "
                       f"train / {result.valid_images} valid, {len(result.labels)} labels) on {result.device}")
            click.echo(f"  weights: {result.weights}; artifacts in {result.artifact_dir}")

    def on_lr(lr: float) -> None:
        if display.talk:
            display.close()
            click.echo(f"  lr_find suggests lr {lr:.2e} (plot: lr_find.png)")

    hooks = TrainHooks(display.count, display.stage, on_start, on_lr, display.batch, display.epoch)
    display.stage("the catalog and the training libraries")
    try:
        with opts.session() as (catalog, session):
            if resume_ref is not None:
                result = resume_run(session, catalog.store, resume_ref, _runs_root(catalog), hooks,
                                    device if "device" in given else None, workers)
            else:
                weights = str(weights_file.resolve()) if weights_file else PRETRAINED if pretrained else NO_WEIGHTS
                config = TrainConfig(snapshot_name, arch, weights, epochs, freeze_epochs, _parse_lr(lr_text), lr_mult,
                                     fp16, _parse_sizes(size, sizes), presize, halve_bs, not no_flip, bs, workers, tta,
                                     seed, device, cache, save, early_stop, folds)
                if nproc > 1 and "WORLD_SIZE" not in os.environ:
                    config.check(nproc)
                    display.close()
                    _launch_processes(ctx, opts, nproc)
                    return
                result = train_snapshot(session, catalog.store, config, _runs_root(catalog), hooks)
    except KeyboardInterrupt:
        display.close()
        _interrupted(opts, display.run_id)
    finally:
        display.close()
    if rank:
        return
    if as_json:
        echo_json(result.as_dict())
        return
    tta_text = f", TTA accuracy {result.tta_accuracy:.4f}" if result.tta_accuracy is not None else ""
    stopped = f"; stopped early after {len(result.epochs)} epochs" if result.stopped_early else ""
    click.echo(f"Run {result.run_id} done in {result.seconds:.1f} s{stopped}: exported epoch {result.exported_epoch}"
               f" (--save {save if resume_ref is None else 'as recorded'}): valid loss {_fmt(result.valid_loss)}, "
               f"accuracy {_fmt(result.accuracy)}{tta_text}; model {result.artifact_dir / 'export.pkl'}, "
               f"curves {result.artifact_dir / 'curves.png'}")
    if result.fold_losses:
        click.echo(f"  out-of-fold losses for {result.fold_losses} image(s): `fastclass clean --order loss --run "
                   f"{result.run_id}` walks them highest first")


def _interrupted(opts: Options, run_id: int | None) -> None:
    """Ctrl-C: say what the interrupted run kept and how to continue it, then exit 130."""
    from db.models import RunStatus, TrainingRun
    from trainer.runs import epoch_count

    if run_id is None:
        click.echo("Error: interrupted before the run began; nothing was recorded", err=True)
        click.get_current_context().exit(130)
    with opts.session() as (_, session):
        epochs = epoch_count(session, run_id)
        done = session.get(TrainingRun, run_id).status == RunStatus.DONE.value
    if done:
        click.echo(f"Error: interrupted while training the fold models; run {run_id} is done and exported, but no "
                   "out-of-fold loss was recorded (train again with --folds for them)", err=True)
    elif epochs:
        click.echo(f"Error: interrupted; run {run_id} keeps its {epochs} completed epoch(s): continue it with "
                   f"`fastclass train --resume {run_id}`", err=True)
    else:
        click.echo(f"Error: interrupted; run {run_id} stopped before its first epoch ended (nothing to resume)",
                   err=True)
    click.get_current_context().exit(130)


def _launch_processes(ctx: click.Context, opts: Options, nproc: int) -> None:
    """Run this same train command in nproc processes under torchrun (one machine); exit with its status."""
    import subprocess

    args = ["--catalog", opts.location] + (["-v"] if opts.verbose else ["-q"] if opts.quiet else []) + ["train"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name == "nproc" or value is None or not isinstance(param, click.Option):
            continue
        if param.is_flag and param.secondary_opts:
            args.append(param.opts[0] if value else param.secondary_opts[0])
        elif param.is_flag:
            if value:
                args.append(param.opts[0])
        else:
            args += [param.opts[0], str(value.resolve() if isinstance(value, Path) else value)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "fastclass", *args]
    log.debug("launching: %s", " ".join(command))
    ctx.exit(subprocess.run(command).returncode)


@cli.group(invoke_without_command=True)
@click.option("--limit", type=COUNT, help="Only the newest N runs.")
@json_option("runs")
@click.pass_context
def runs(ctx: click.Context, limit: int | None, as_json: bool) -> None:
    """Training runs, newest first: snapshot, architecture, status and final metrics."""
    if ctx.invoked_subcommand is not None:
        return
    from trainer.runs import list_runs

    with ctx.find_object(Options).session() as (_, session):
        rows = list_runs(session, limit)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("No training runs yet; start one with `fastclass train --snapshot NAME`.")
    for row in rows:
        tta = f" tta {row['tta_accuracy']:.4f}" if row["tta_accuracy"] is not None else ""
        click.echo(f"{row['id']:5d} {row['status']:11s} {row['arch'][:22]:22s} {row['snapshot'][:20]:20s} "
                   f"epochs {row['epochs']:3d}  valid_loss {_fmt(row['valid_loss'])}  accuracy {_fmt(row['accuracy'])}"
                   f"{tta}  {row['started_at']:%Y-%m-%d %H:%M}  {row['seconds']:.0f} s"
                   + (f"\n      error: {row['error']}" if row["error"] else ""))


@runs.command("show")
@click.argument("run_id", metavar="RUN")
@json_option("run")
@pass_options
def runs_show(opts: Options, run_id: str, as_json: bool) -> None:
    """One run: config, code version, device, and every epoch's metrics."""
    from trainer.runs import show_run

    with opts.session() as (_, session):
        data = show_run(session, run_id)
    if as_json:
        echo_json(data)
        return
    click.echo(f"Run {data['id']} ({data['status']}): {data['arch']} on snapshot {data['snapshot']} "
               f"({data['snapshot_digest'][:12]})")
    click.echo(f"  device   {data['device']} on {data['host']}; fastclass {data['code_version']}")
    click.echo(f"  started  {data['started_at']:%Y-%m-%d %H:%M:%S} UTC, {data['seconds']:.1f} s")
    click.echo(f"  weights  {data['config'].get('weights_loaded')}")
    config = data["config"]
    shown = ("epochs", "freeze_epochs", "lr", "lr_found", "lr_mult", "sizes", "bs", "fp16", "flip", "tta", "seed",
             "save", "early_stop")
    click.echo("  config   " + " ".join(f"{k}={config[k]}" for k in shown if k in config))
    exported = config.get("exported_epoch")
    click.echo((f"  result   epoch {exported}: " if exported is not None else "  result   ")
               + f"valid_loss {_fmt(data['valid_loss'])}  accuracy {_fmt(data['accuracy'])}"
               + (f"  tta_accuracy {data['tta_accuracy']:.4f}" if data["tta_accuracy"] is not None else ""))
    if config.get("stopped_early"):
        click.echo(f"  stopped  early: {config['early_stop']} epoch(s) without a lower valid loss")
    if data["error"]:
        click.echo(f"  error    {data['error']}")
    click.echo(f"  artifacts {data['artifact_dir']}")
    if data["epoch_rows"]:
        click.echo(EPOCH_HEADER)
        from types import SimpleNamespace

        for row in data["epoch_rows"]:
            click.echo(_epoch_line(SimpleNamespace(**row)))


@runs.command("compare")
@click.argument("run_refs", nargs=-1, required=True, metavar="RUN RUN [RUN...]")
@click.option("--out", "out_file", type=click.Path(path_type=Path), metavar="FILE",
              help="The overlay curves PNG [default: runs/compare-A-B.png in the catalog's folder].")
@json_option("comparison")
@pass_options
def runs_compare(opts: Options, run_refs: tuple[str, ...], out_file: Path | None, as_json: bool) -> None:
    """Runs side by side: metrics, the options that differ, and one PNG of their curves overlaid."""
    from trainer.plots import plot_compare
    from trainer.runs import EpochRow, compare_runs

    with opts.session() as (catalog, session):
        data = compare_runs(session, list(run_refs))
        out = out_file or _runs_root(catalog) / ("compare-" + "-".join(str(i) for i in data["runs"]) + ".png")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        plot_compare({run_id: [EpochRow(**row) for row in rows] for run_id, rows in data["epoch_rows"].items()},
                     out)
    except OSError as exc:
        raise click.ClickException(f"cannot write {out}: {exc.strerror or exc}") from None
    data["curves"] = str(out)
    if as_json:
        echo_json(data)
        return
    width = max(12, *(len(str(v)) + 2 for values in data["differences"].values() for v in values))

    def line(name: str, values) -> str:
        return f"{name:16s}" + "".join(f"{_shown(v, name.strip()):>{width}s}" for v in values)

    click.echo(line("", [f"run {i}" for i in data["runs"]]))
    for name, values in data["metrics"].items():
        click.echo(line(name, values))
    if data["differences"]:
        click.echo("options that differ:")
        for name, values in data["differences"].items():
            click.echo(line("  " + name, values))
    else:
        click.echo("options that differ: none")
    click.echo(f"curves: {out}")


def _shown(value, name: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if name == "seconds" else f"{value:.4g}" if name == "lr_found" else f"{value:.4f}"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), metavar="DIR",
              help="Where to write the reports [default: the run's folder/interpret].")
@click.option("--top", type=click.IntRange(1), default=20, show_default=True, help="How many top losses to list.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              envvar="FASTCLASS_DEVICE")
@json_option("result")
@pass_options
def interpret(opts: Options, run_id: str, out_dir: Path | None, top: int, device: str, as_json: bool) -> None:
    """Confusion matrix, most-confused pairs, per-class accuracy and top losses of a run (losses kept for clean)."""
    from trainer.interpret import interpret_run

    with opts.session() as (catalog, session):
        result = interpret_run(session, catalog.store, run_id, out_dir, top, device)
    if as_json:
        echo_json(result.as_dict())
        return
    click.echo(f"Run {result.run_id}: valid accuracy {result.valid_accuracy:.4f} on {result.valid_images} image(s); "
               f"losses of all {result.images} image(s) stored (`fastclass clean --order loss --run {result.run_id}`).")
    click.echo(f"{'label':30s} {'valid':>6s} {'correct':>8s} {'accuracy':>9s}")
    for row in result.per_class:
        click.echo(f"{row['label'][:30]:30s} {row['valid']:6d} {row['correct']:8d} {_fmt(row['accuracy']):>9s}")
    if result.most_confused:
        click.echo("Most confused (actual -> predicted):")
        for row in result.most_confused[:10]:
            click.echo(f"  {row['count']:5d}  {row['actual']} -> {row['predicted']}")
    click.echo(f"Top {len(result.top_losses)} losses:")
    for row in result.top_losses:
        click.echo(f"  image {row['image']:<7d} {row['split']:5s} {row['label'][:20]:20s} predicted "
                   f"{row['predicted'][:20]:20s} p={row['probability']:.3f} loss {row['loss']:.3f}")
    click.echo(f"Reports in {result.out_dir}: " + ", ".join(sorted(Path(f).name for f in result.files.values())))


@cli.command()
@click.argument("run_ref", metavar="RUN")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="IMAGE_OR_DIR...")
@click.option("--tta", is_flag=True, help="Average the predictions over test-time augmentations.")
@click.option("--top", "top_k", type=click.IntRange(1), default=3, show_default=True, help="Classes listed per image.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.0, show_default=True, metavar="P",
              help="Answer `unknown` when the top class's probability is under P (its top classes still listed).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              envvar="FASTCLASS_DEVICE")
@json_option("predictions")
@pass_options
def predict(opts: Options, run_ref: str, images: tuple[Path, ...], tta: bool, top_k: int, threshold: float,
            device: str, as_json: bool) -> None:
    """Class and probability per image. RUN is a run id of the catalog, or the path of a run folder (or its
    export.pkl; write ./1 for a folder named 1), which needs no catalog."""
    from trainer.predict import predict_images

    if run_ref.isdigit():
        # A run id, always: a folder that happens to be named like one (class folders 0-9) must not decide
        # which pickle runs. Give a folder as a path (./1) to use it.
        from fastclass.catalog import find_run

        with opts.session() as (_, session):
            run_path = Path(find_run(session, run_ref).artifact_dir)
    else:
        run_path = Path(run_ref)
        if not run_path.exists():
            raise click.BadParameter(f"{run_ref!r} is neither a run id nor a run folder", param_hint="RUN")
    results = predict_images(run_path, list(images), tta, device, top_k, threshold)
    failed = [r for r in results if r.error]
    if as_json:
        echo_json([r.as_dict() for r in results])
    else:
        for r in results:
            if r.error is None:
                others = "  ".join(f"{name} {p:.3f}" for name, p in (r.top if r.unknown else r.top[1:]))
                label = "unknown" if r.unknown else r.label
                click.echo(f"{r.path}\t{label}\t{r.probability:.4f}" + (f"\t({others})" if others else ""))
    for r in failed:
        click.echo(f"Warning: {r.path}: {r.error}; skipped", err=True)
    if failed and len(failed) == len(results):
        raise click.ClickException("none of the files is an image that can be decoded")
