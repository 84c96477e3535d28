"""The command line: exit codes, exact one-line errors, tracebacks only with -v, help for every command."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from db.engine import display_url
from fastclass.cli import cli
from tests.helpers import photo_like, run_cli


def test_init_then_stats_on_an_empty_catalog(tmp_path):
    location = str(tmp_path / "c.db")
    result = run_cli(["init"], location)
    assert result.exit_code == 0
    assert result.stdout == f"Catalog created {location} (image store {tmp_path / 'images'})\n"
    assert run_cli(["init"], location).stdout.startswith("Catalog up to date:")
    data = json.loads(run_cli(["stats", "--json"], location).stdout)
    assert data == {"images": {"total": 0, "ok": 0, "pending": 0, "rejected": 0, "duplicate": 0, "deleted": 0},
                    "labels": {}, "engines": {}, "conflicts": 0}


def test_catalog_location_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCLASS_CATALOG", str(tmp_path / "env.db"))
    assert run_cli(["init"]).exit_code == 0
    assert (tmp_path / "env.db").exists() and (tmp_path / "images").is_dir()


@pytest.mark.parametrize("args, message", [
    (["stats"], "Error: no catalog at {tmp}/missing.db; create one with `fastclass init`"),
    (["import", "{tmp}/nowhere"], "Error: no catalog at {tmp}/missing.db; create one with `fastclass init`"),
])
def test_missing_catalog(tmp_path, args, message):
    result = run_cli([a.format(tmp=tmp_path) for a in args], str(tmp_path / "missing.db"))
    assert (result.exit_code, result.stderr) == (1, message.format(tmp=tmp_path) + "\n")


def test_missing_import_folder(initialized_catalog, tmp_path):
    result = run_cli(["import", str(tmp_path / "nowhere")], initialized_catalog)
    assert (result.exit_code, result.stderr) == (1, f"Error: folder {tmp_path / 'nowhere'} does not exist\n")


def test_unwritable_catalog_location(tmp_path):
    (tmp_path / "afile").write_text("x")
    result = run_cli(["init"], str(tmp_path / "afile" / "c.db"))
    assert result.exit_code == 1
    assert result.stderr == f"Error: cannot create catalog {tmp_path}/afile/c.db: {tmp_path}/afile is not a folder\n"
    result = run_cli(["init"], str(tmp_path / "no" / "such" / "c.db"))
    assert result.stderr == f"Error: cannot create catalog {tmp_path}/no/such/c.db: folder {tmp_path}/no/such does not exist\n"


def test_unreachable_postgresql_url_masks_password():
    result = run_cli(["stats"], "postgresql+psycopg://postgres:hunter2@127.0.0.1:1/none")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: cannot open catalog postgresql+psycopg://postgres:***@127.0.0.1:1/none: ")
    assert "hunter2" not in result.stderr and result.stderr.count("\n") == 1


def test_file_that_is_not_a_catalog(tmp_path):
    (tmp_path / "junk.db").write_bytes(b"this is not sqlite" * 100)
    result = run_cli(["stats"], str(tmp_path / "junk.db"))
    assert (result.exit_code, result.stderr) == (
        1, f"Error: cannot open catalog sqlite:///{tmp_path}/junk.db: file is not a database\n")


def test_missing_image_store_is_never_replaced_by_an_empty_one(initialized_catalog, tmp_path):
    (tmp_path / "in" / "cats").mkdir(parents=True)
    (tmp_path / "in" / "cats" / "a.png").write_bytes(photo_like(1))
    assert run_cli(["import", str(tmp_path / "in")], initialized_catalog).exit_code == 0
    (tmp_path / "images").rename(tmp_path / "moved")
    hint = "restore the folder, or if it moved, point the catalog at it with `fastclass init --store NEW_PATH`"
    assert run_cli(["stats"], initialized_catalog).stderr == f"Error: image store {tmp_path}/images is missing; {hint}\n"
    # Before: init made an empty store here, and verify --recheck --prune then lost the dataset.
    refused = run_cli(["init"], initialized_catalog)
    shown = initialized_catalog if "://" not in initialized_catalog else display_url(initialized_catalog)
    assert refused.stderr == (f"Error: catalog {shown} holds 1 image(s) "
                              f"but its image store {tmp_path}/images is missing; {hint}\n")
    assert not (tmp_path / "images").exists()
    assert "is not an image store" in run_cli(["init", "--store", str(tmp_path / "nowhere")], initialized_catalog).stderr
    moved = run_cli(["init", "--store", str(tmp_path / "moved")], initialized_catalog)
    assert moved.exit_code == 0, moved.stderr
    assert json.loads(run_cli(["verify", "--json"], initialized_catalog).stdout)["ok"] == 1
    assert "still there" in run_cli(["init", "--store", str(tmp_path / "other")], initialized_catalog).stderr


def test_usage_errors_exit_2(initialized_catalog):
    assert run_cli(["stats", "--bogus"], initialized_catalog).exit_code == 2
    assert run_cli(["no-such-command"], initialized_catalog).exit_code == 2
    assert run_cli(["import"], initialized_catalog).exit_code == 2
    assert run_cli(["-v", "-q", "stats"], initialized_catalog).exit_code == 2


def test_traceback_only_with_verbose(tmp_path):
    quiet = run_cli(["stats"], str(tmp_path / "missing.db"))
    loud = run_cli(["-v", "stats"], str(tmp_path / "missing.db"))
    assert "Traceback" not in quiet.stderr
    assert "Traceback" in loud.stderr and loud.stderr.rstrip().endswith("create one with `fastclass init`")


def test_every_command_has_help():
    for name, command in cli.commands.items():
        assert command.help, f"{name} has no help text"
        assert run_cli([name, "--help"]).exit_code == 0


def test_help_does_not_import_torch_or_fastai():
    code = "import sys; from fastclass.cli import main; sys.argv=['fastclass','--help']\n" \
           "try:\n    main()\nexcept SystemExit:\n    pass\n" \
           "assert 'torch' not in sys.modules and 'fastai' not in sys.modules, 'heavy import at --help'"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_reading_commands_do_not_import_image_or_migration_libraries(sqlite_catalog):
    heavy = ["PIL", "numpy", "scipy", "torch", "fastai", "alembic", "urllib3", "icrawler"]
    for command in (["stats"], ["labels"], ["jobs"], ["snapshot", "list"]):
        code = ("import sys; from fastclass.cli import main\n"
                f"sys.argv = ['fastclass', '--catalog', {sqlite_catalog!r}, *{command!r}]\n"
                "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
                f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().splitlines()[-1] == "[]", (command, done.stdout)


def test_audit_and_embed_list_do_not_import_the_deep_learning_stack(sqlite_catalog):
    """An audit works on stored vectors: seconds of torch and fastai imports would be all of its time on a
    small catalog (measured: 12.7 s of imports for a 1 s audit)."""
    for command, expected_exit in ((["audit", "show"], 1), (["embed", "--list"], 0), (["audit"], 1)):
        code = ("import sys; from fastclass.cli import main\n"
                f"sys.argv = ['fastclass', '--catalog', {sqlite_catalog!r}, *{command!r}]\n"
                "try:\n    main()\nexcept SystemExit as exc:\n    print('exit', exc.code or 0)\n"
                "print(sorted(m for m in ('torch', 'fastai', 'timm') if m in sys.modules))\n")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.stdout.strip().splitlines()[-2:] == [f"exit {expected_exit}", "[]"], (command, done.stdout,
                                                                                           done.stderr)
