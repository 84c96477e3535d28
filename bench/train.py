"""bench/train: does the data pipeline keep the accelerator busy? The model step alone vs `fastclass train`.

(a) the pure model step: forward + backward + optimizer on synthetic tensors already on the device (AMP and
channels-last on a GPU), images/s per architecture; (b) `train_snapshot` on a snapshot of `--count` 640x480
JPEGs, images/s of its unfrozen epochs (the same batch size, precision and memory layout). Target on a GPU:
(b) >= 0.9 x (a). Also (c): the per-item CPU cost of the loader (JPEG decode + presize), per core, which says
how many workers one GPU needs.

Run: .venv/bin/python bench/train.py [--count 5000] [--archs resnet34,resnet50] [--size 224] [--bs 128]
(writes the "Train" section of docs/benchmarks.md; on a machine without a GPU it says so and measures at
--count/--size you give, which shows the pipeline works but is not the target)
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, write_section  # noqa: E402
from fastclass.catalog import init_catalog, open_catalog  # noqa: E402
from fastclass.sample import write_web_jpegs  # noqa: E402


def device_description(device) -> str:
    import torch

    if device.type != "cuda":
        return f"CPU only (no CUDA GPU visible), torch {torch.__version__}"
    driver = "unknown driver"
    try:
        driver = "driver " + subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return (f"{torch.cuda.get_device_name(device)}, {driver}, CUDA {torch.version.cuda}, torch {torch.__version__}, "
            f"cudnn {torch.backends.cudnn.version()}")


def model_step_rate(arch: str, size: int, bs: int, device, steps: int, classes: int) -> float:
    """Images/s of forward + backward + Adam step on synthetic data on the device, as the trainer builds the model."""
    import torch
    from fastai.vision.learner import add_head

    from trainer.archs import build_body, get_arch

    body = build_body(get_arch(arch), "none")
    model = add_head(body.module, body.features, classes, pool=body.needs_pool).to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    x = torch.randn(bs, 3, size, size, device=device)
    if cuda:
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (bs,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    model.train()
    for _ in range(max(3, steps // 5)):
        step()
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    return steps * bs / (time.perf_counter() - started)


def item_rate(data, size: int, count: int, cache=None) -> float:
    """Items/s of one core through the loader's per-item work: from files (decode, presize, to tensor) or
    from the presize cache (a copy out of the memory-mapped file)."""
    from trainer.data import build_dataloaders

    dls = build_dataloaders(data, size, None, 16, 0, True, ([0.5] * 3, [0.5] * 3), "cpu", cache)
    dl = dls.train
    count = min(count, len(dl.dataset))
    started = time.perf_counter()
    for index in range(count):
        dl.do_item(index)
    return count / (time.perf_counter() - started)


def build_snapshot(work: Path, count: int, classes: int) -> str:
    jpegs = work / "jpegs"
    for index, path in enumerate(write_web_jpegs(work / "flat", count)):
        target = jpegs / f"class{index % classes}" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        path.rename(target)
    location = str(work / "catalog.db")
    init_catalog(location)
    for args in (["import", str(jpegs)], ["verify"], ["split"], ["snapshot", "create", "bench"]):
        subprocess.run([sys.executable, "-m", "fastclass", "-q", "--catalog", location, *args], check=True,
                       stdout=subprocess.DEVNULL)
    return location


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, help="JPEGs in the snapshot [default: 5000 on a GPU, 300 on the CPU].")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--archs", help="[default: resnet34,resnet50 on a GPU, resnet18 on the CPU]")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--bs", type=int, help="[default: 128 on a GPU, 32 on the CPU]")
    parser.add_argument("--epochs", type=int, default=2, help="Unfrozen epochs of the train run (the first warms up).")
    parser.add_argument("--steps", type=int, help="Timed model steps per architecture [default: 50 on a GPU, 5 on the CPU].")
    parser.add_argument("--workers", type=int, help="Loader processes for the train run [default: the trainer's].")
    parser.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                        help="Presize cache for the train run [default: the trainer's, on with a GPU].")
    args = parser.parse_args()

    from trainer.data import presize_cache, presize_for, snapshot_data
    from trainer.train import TrainConfig, resolve_device, train_snapshot

    device = resolve_device("auto")
    gpu = device.type == "cuda"
    # The CPU run only shows the pipeline works; at GPU sizes it would take hours.
    for name, on_gpu, on_cpu in (("count", 5000, 300), ("archs", "resnet34,resnet50", "resnet18"), ("bs", 128, 32),
                                 ("steps", 50, 5)):
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if gpu else on_cpu)
    work = Path(tempfile.mkdtemp(prefix="fastclass-bench-train-"))
    rows = []
    try:
        location = build_snapshot(work, args.count, args.classes)
        catalog = open_catalog(location)
        with catalog.session() as session:
            data = snapshot_data(session, catalog.store, "bench")
        per_item = item_rate(data, args.size, 300)
        started = time.perf_counter()
        cache = presize_cache(data, presize_for(args.size, None), work / "cache")
        cache_seconds = time.perf_counter() - started
        per_cached_item = item_rate(data, args.size, 300, cache)
        for arch in args.archs.split(","):
            step = model_step_rate(arch, args.size, args.bs, device, args.steps, args.classes)
            config = TrainConfig("bench", arch, "none", epochs=args.epochs, freeze_epochs=0, sizes=(args.size,),
                                 bs=args.bs, workers=args.workers, device="auto", cache=args.cache)
            with catalog.session() as session:
                result = train_snapshot(session, catalog.store, config, work / "runs")
            best = max(row.images_per_s for row in result.epochs[1:] or result.epochs)
            workers = 0 if args.workers is None and device.type != "cuda" else args.workers
            rows.append((arch, step, best, result.epochs, workers))
            print(f"{arch}: model step {step:.0f} images/s, fastclass train {best:.0f} images/s", flush=True)
        catalog.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = "\n".join(f"| {arch} | {step:.0f} | {best:.0f} | **{best / step:.2f}** |" for arch, step, best, _, _ in rows)
    verdict = ("Target: (b) >= 0.9 x (a) on the GPU." if gpu else
               "**No GPU was available for this run: these are CPU figures, which show the pipeline works end "
               "to end but say nothing of the GPU target ((b) >= 0.9 x (a)); the GPU figures are still open.**")
    body = f"""
`bench/train.py {" ".join(sys.argv[1:])}` ({time.strftime('%Y-%m-%d')}), machine: {machine()}; accelerator: {device_description(device)};
Python {platform.python_version()}.

{args.count} JPEGs of 640x480 in {args.classes} classes, {args.size} px, batch size {args.bs}, from random weights
({"AMP fp16 and channels-last" if gpu else "fp32"}). (a) forward + backward + Adam on synthetic tensors already on
the device; (b) `fastclass train` (the service, one process), best unfrozen epoch's training images/s after the
first (warm-up) epoch, loader workers: {rows[0][4] if rows and rows[0][4] is not None else "the trainer's default"},
presize cache: {"the trainer's default (on with a GPU)" if args.cache is None else args.cache}.

| arch | (a) model step, images/s | (b) fastclass train, images/s | (b) / (a) |
|---|---|---|---|
{table}

(c) the loader's per-item CPU work on one core, at presize {presize_for(args.size, None)} px: from the files (JPEG
decode, centre crop and resize, to tensor) **{per_item:.0f} items/s**; from the presize cache (built once in
{cache_seconds:.1f} s with {os.cpu_count()} threads) **{per_cached_item:.0f} items/s**. Feeding (a) takes about
(a) / that many loader cores.

{verdict}
"""
    print(body)
    write_section("Train", body)


if __name__ == "__main__":
    main()
