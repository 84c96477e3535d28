"""The docs keep up with the code: every command and subcommand is in the CLI reference."""
from pathlib import Path

import click

from fastclass.cli import cli

DOCS = Path(__file__).resolve().parents[1] / "docs"


def command_names(group: click.Group, prefix: str = "") -> list[str]:
    names = []
    for name, command in group.commands.items():
        names.append(prefix + name)
        if isinstance(command, click.Group):
            names += command_names(command, f"{prefix}{name} ")
    return names


def test_every_command_is_documented_in_the_cli_reference():
    reference = (DOCS / "cli.md").read_text()
    for name in command_names(cli):
        assert f"## `{name}`" in reference, f"docs/cli.md has no section for `{name}`"
