"""The documents an operator reads: each is linked from the README, and every `s2s ...` and
`make ...` command they quote exists, with the options it is quoted with (checked against the
typer CLI and the Makefile, so a renamed command or option fails here instead of in front of a user)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

from .conftest import REPO

DOCS = ["README.md", "CONTRIBUTING.md", "CHANGELOG.md", "EXECUTIVE_SUMMARY.md", *sorted(
    str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
LINKED = ["docs/architecture.md", "docs/operations.md", "docs/troubleshooting.md", "docs/faq.md", "CHANGELOG.md",
          "CONTRIBUTING.md", "EXECUTIVE_SUMMARY.md", "docs/protocol.md", "docs/benchmarks.md"]
COMMAND = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(?:\S*\.venv/bin/)?(s2s|make)\s+(\S.*)$")


def quoted_commands(text: str) -> list[tuple[str, str]]:
    """(program, arguments) of every command in a code span or a line of a fenced block."""
    candidates = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        candidates += block.splitlines()
    found = []
    for candidate in candidates:
        match = COMMAND.match(candidate.strip())
        # "make ui: ... failed" is a message, "every `s2s ...` command" is prose
        if match and not match.group(2).split()[0].endswith(":") and match.group(2).strip() != "...":
            found.append((match.group(1), match.group(2).split("#")[0].strip()))
    return found


def _make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", (REPO / "Makefile").read_text(), flags=re.M))


def _cli():
    from s2s.cli import app

    return typer.main.get_command(app)


def _is_group(command) -> bool:
    """A command group (typer ships its own click: duck-typed)."""
    return hasattr(command, "commands")


def _alternatives(arguments: str) -> list[str]:
    """Split at ' | ' outside brackets: `report [--model A | B] | approve` -> two commands."""
    parts, depth, current = [], 0, ""
    for i, char in enumerate(arguments):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "|" and depth == 0 and arguments[i - 1: i + 2] == " | ":
            parts.append(current.strip())
            current = ""
            continue
        current += char
    return [*parts, current.strip()]


def check_s2s(arguments: str, cli) -> None:
    """Walk the command path, then check every --option against the command it reaches; ' | '
    separates alternative subcommands of the same group (the README's command list)."""
    parent: list[str] = []
    for part_index, part in enumerate(_alternatives(arguments)):
        command = cli
        path = list(parent) if part_index else []
        for name in path:
            command = command.commands[name]
        for token in part.split():
            token = token.strip("[]()")
            if not token or token in ("...", "|") or not (token.startswith("-") or _is_group(command)):
                continue
            if _is_group(command):
                assert token in command.commands, f"`s2s {' '.join(path)} {token}`: no such command"
                command = command.commands[token]
                path.append(token)
                continue
            if token.startswith("--"):
                option = token.split("=")[0]
                names = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
                assert option in names, f"`s2s {' '.join(path)}` has no option {option}"
        assert not _is_group(command), f"`s2s {' '.join(path)}` is a group, not a command"
        parent = path[:-1]


@pytest.mark.parametrize("doc", DOCS)
def test_every_quoted_command_exists(doc: str):
    text = (REPO / doc).read_text()
    cli, targets = _cli(), _make_targets()
    for program, arguments in quoted_commands(text):
        if program == "make":
            target = next((t for t in arguments.split() if "=" not in t), "")
            assert target in targets, f"{doc}: `make {arguments}`: no target {target!r} in the Makefile"
        else:
            check_s2s(arguments, cli)


def test_the_docs_are_linked_from_the_readme():
    readme = (REPO / "README.md").read_text()
    for doc in LINKED:
        assert f"]({doc})" in readme, f"README does not link {doc}"
        assert (REPO / doc).is_file()


def test_the_checker_catches_a_wrong_command_and_a_wrong_option():
    cli = _cli()
    check_s2s("signoff report [--version N] | approve --role R --name NAME", cli)
    with pytest.raises(AssertionError, match="no such command"):
        check_s2s("signoff sign --version 1", cli)
    with pytest.raises(AssertionError, match="has no option --model"):
        check_s2s("signoff report --model 1", cli)
    assert quoted_commands("run `make ui` then\n```bash\ns2s serve --port 8001 &   # again\n```") == [
        ("make", "ui"), ("s2s", "serve --port 8001 &")]
