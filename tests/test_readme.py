"""The README's commands exist: every `lmtune ...` line in its code blocks parses with the real CLI parser."""

import re
import shlex
from pathlib import Path

import pytest

from lmtune.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    blocks = re.findall(r"```(?:\w*)\n(.*?)```", README.read_text(), re.S)
    commands, pending = [], ""
    for block in blocks:
        for line in block.splitlines():
            line = pending + line.split("  #")[0].strip()
            pending = ""
            if line.endswith("\\"):
                pending = line[:-1] + " "
            elif line.startswith("lmtune "):
                commands.append(line)
    return commands


def test_readme_shows_the_two_commands_first():
    first_block = re.search(r"```(?:\w*)\n(.*?)```", README.read_text(), re.S).group(1)
    assert [line.split("#")[0].strip() for line in first_block.splitlines()] == ["make demo", "make test"]


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command):
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert args.command == shlex.split(command)[1]


def test_readme_has_commands():
    assert len(readme_commands()) >= 5
