"""The image store on S3-compatible storage: every command against moto's S3 server on 127.0.0.1."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastclass.catalog import open_catalog
from fastclass.store import S3ImageStore, temp_name
from tests.helpers import catalog_rows, digit_images, image_bytes, run_cli, write

moto_server = pytest.importorskip("moto.server")
pytest.importorskip("s3fs")


@pytest.fixture(scope="module")
def s3_endpoint():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_endpoint, tmp_path, monkeypatch):
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": s3_endpoint, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def objects(url: str) -> set[str]:
    return set(S3ImageStore(url).iter_files())


def markers(url: str) -> list:
    return S3ImageStore(url)._temp_entries()


def test_every_command_works_on_an_s3_store(s3_env, tmp_path):
    url = f"s3://fastclass-{tmp_path.name.lower().replace('_', '-')[:30]}/team/images"
    location = str(tmp_path / "catalog.db")
    created = run_cli(["init", "--store", url], location)
    assert created.exit_code == 0 and created.stdout == f"Catalog created {location} (image store {url})\n"
    spec = digit_images({"zero": 0, "one": 1, "seven": 7}, 12)
    for label, blobs in spec.items():
        for n, data in enumerate(blobs):
            write(tmp_path / "in" / label / f"{n}.png", data)
    write(tmp_path / "in" / "zero" / "truncated.jpg", image_bytes("JPEG", (200, 150), seed=5)[:700])
    write(tmp_path / "in" / "zero" / "page.jpg", b"<html>403</html>")
    imported = json.loads(run_cli(["import", str(tmp_path / "in"), "--json"], location).stdout)
    assert imported["new_images"] == 37 and imported["skipped"] == {"not an image (HTML/XML text)": 1}
    stored = {row[0] for row in catalog_rows(location, "SELECT store_path FROM images")}
    assert objects(url) == stored and markers(url) == []

    verified = json.loads(run_cli(["verify", "--json"], location).stdout)
    assert verified["ok"] == 36 and verified["rejected"] == {"truncated image data": 1}
    assert run_cli(["dedup"], location).exit_code == 0
    assert run_cli(["split"], location).exit_code == 0
    assert run_cli(["snapshot", "create", "s3-v1"], location).exit_code == 0
    exported = run_cli(["snapshot", "export", "s3-v1", str(tmp_path / "export"), "--json"], location)
    held = catalog_rows(location, "SELECT count(*) FROM snapshot_items")[0][0]
    assert held >= 24 and json.loads(exported.stdout)["files"] == held
    assert len(list((tmp_path / "export").rglob("*.png"))) == held

    trained = run_cli(["train", "--snapshot", "s3-v1", "--arch", "resnet18", "--no-pretrained", "--size", "32",
                       "--epochs", "1", "--bs", "8", "--device", "cpu", "--json"], location)
    assert trained.exit_code == 0, trained.output
    run_dir = json.loads(trained.stdout)["artifact_dir"]
    assert run_dir == str(tmp_path / "runs" / "1")
    probe = write(tmp_path / "probe.png", spec["seven"][0])
    assert json.loads(run_cli(["predict", run_dir, str(probe), "--json"], location).stdout)[0]["label"]

    pruned = json.loads(run_cli(["prune", "--json"], location).stdout)
    assert pruned["removed"] == 1
    assert objects(url) == stored - {row[0] for row in catalog_rows(
        location, "SELECT store_path FROM images WHERE status = 'deleted'")}


def test_objects_a_dead_writer_left_are_cleared_when_the_catalog_opens(s3_env, tmp_path):
    url = f"s3://fastclass-crash-{tmp_path.name.lower().replace('_', '-')[:20]}/p"
    location = str(tmp_path / "catalog.db")
    assert run_cli(["init", "--store", url], location).exit_code == 0
    data = image_bytes("PNG", (40, 40), seed=3)
    # A writer that uploads and is killed before its catalog rows commit: the marker and the object stay.
    script = ("import os, signal, hashlib\n"
              "from fastclass.store import S3ImageStore\n"
              f"data = {data!r}\n"
              f"S3ImageStore({url!r}).put(hashlib.sha256(data).hexdigest(), 'png', data)\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, **s3_env})
    assert proc.returncode == -9
    assert len(objects(url)) == 1 and len(markers(url)) == 1
    store = S3ImageStore(url)
    live = store.put("a" * 64, "png", data)  # a live writer's: kept
    open_catalog(location).close()
    assert objects(url) == {live.relpath} and [m[0] for m in markers(url)] == [live.temp]
    assert temp_name("a" * 64, "h").startswith("a" * 64 + ".h.")


def test_an_unreachable_store_is_one_clear_line(s3_env, tmp_path, monkeypatch):
    location = str(tmp_path / "catalog.db")
    assert run_cli(["init", "--store", "s3://fastclass-gone/x"], location).exit_code == 0
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    result = run_cli(["stats"], location)
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: cannot reach image store s3://fastclass-gone/x: ")
    assert result.stderr.count("\n") == 1
