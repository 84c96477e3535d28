"""The docs keep up with the code: every command is in the CLI reference."""
from pathlib import Path

from fastclass.cli import cli

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_every_command_is_documented_in_the_cli_reference():
    reference = (DOCS / "cli.md").read_text()
    for name in cli.commands:
        assert f"## `{name}`" in reference, f"docs/cli.md has no section for `{name}`"
