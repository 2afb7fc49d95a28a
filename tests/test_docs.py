"""The documentation against the code: every command it shows, its links, the README's
size and the one Parameters table.

Commands are read from the fenced ```bash / ```sh / ```shell / ```console blocks of the
pages below (continuation lines joined, quoted scripts kept whole, comments dropped, `&&`,
`;` and pipes split into their commands) and from inline code in their prose that starts
with `make`, `pix2pix` or `python -m`. Each is checked without running it:

- `make [TARGET] [VAR=value ...]`: the target is one of the Makefile's, every VAR is one
  the Makefile reads, and `make -n` with the same arguments succeeds.
- `python -m MODULE ...` (also `python3`, `.venv/bin/python`): MODULE is importable and
  every flag used appears in `python -m MODULE --help`.
- `pix2pix SUBCOMMAND ...` (also `.venv/bin/pix2pix`): the subcommand exists and every
  flag used appears in `pix2pix SUBCOMMAND --help`.

Skipped, because they are not this project's commands or cannot run on the build
machines (no Docker engine, no cluster, no GPU, no network): `docker`, `kubectl`,
`haproxy`, `openssl`, `curl`, `hf`, `git`, `pip` (installs), `ruff` (the linter; `make
lint` is checked), `grep` (reads /proc/cpuinfo), `export` (sets a shell variable; the
OpenAI API's curl line and SDK snippets that use them run in tests/test_api.py). A `bash
-c '...'` script inside a skipped command is still read, so the `python3 -m ...` commands
inside `docker run` are checked.
Any other command fails the test until it is added to one list or the other.

Several documented commands also run for real in other tests: `make demo`'s command
(tests/test_demo.py), `make deploy-check` (tests/test_deploy.py), `serving.serve` with
`--repository` and `model_repository.publish` (tests/test_scale_out.py), the `pix2pix`
subcommands (tests/test_client_cli.py).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from pix2pix_client import contract
from pix2pix_client.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CLIENT_README = ROOT / "client" / "README.md"
PAGES = sorted(
    [README, CLIENT_README, ROOT / "benchmarks" / "README.md", *(ROOT / "docs").glob("*.md")]
)
README_WORD_LIMIT = 1500
COMMAND_LANGUAGES = {"bash", "sh", "shell", "console"}
SKIPPED = {
    "docker",
    "kubectl",
    "haproxy",
    "openssl",
    "curl",
    "hf",
    "git",
    "pip",
    "ruff",
    "grep",
    "export",
}
PYTHONS = {"python", "python3", ".venv/bin/python"}
PIX2PIX = {"pix2pix", ".venv/bin/pix2pix"}
SEPARATORS = {"&&", "||", ";", "|", "&"}
REDIRECTS = {">", ">>", "<", "2>", "2>&1"}
GENERATED_START = "<!-- generated: pix2pix_client.contract.parameters_table() -->\n"
GENERATED_END = "<!-- end generated -->\n"
HELP_TIMEOUT_S = 120


@dataclass(frozen=True)
class Command:
    """One command shown in a page: where, and its words as a shell would split them."""

    where: str
    words: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.words)}"


# ---------------------------------------------------------------- reading the pages


FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.DOTALL | re.MULTILINE)
INLINE = re.compile(r"`([^`]+)`")


def _fences(text: str) -> list[tuple[str, str, int]]:
    """(language, body, line number of the first body line) of each fenced block."""
    return [
        (match.group(1).strip(), match.group(2), text.count("\n", 0, match.start()) + 2)
        for match in FENCE.finditer(text)
    ]


def _split_words(script: str) -> list[str]:
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def _commands_of(words: list[str], where: str) -> list[Command]:
    """Splits a line's words into commands at `&&`, `;`, pipes; drops redirections; reads
    the script of `bash -c` / `sh -c` as commands of their own."""
    pieces: list[list[str]] = [[]]
    skip_next = False
    for word in words:
        if skip_next:
            skip_next = False
        elif word in SEPARATORS:
            pieces.append([])
        elif word in REDIRECTS:
            skip_next = True
        else:
            pieces[-1].append(word)
    found = []
    for piece in pieces:
        for at, word in enumerate(piece[:-2]):
            if word in ("bash", "sh") and piece[at + 1] == "-c":
                found += _commands_of(_split_words(piece[at + 2]), where)
        while piece and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", piece[0]):
            piece.pop(0)  # an environment assignment before the command
        if piece:
            found.append(Command(where, tuple(piece)))
    return found


def fenced_commands(text: str, name: str) -> list[Command]:
    """Every command in a page's shell blocks."""
    commands = []
    for language, body, first_line in _fences(text):
        if language not in COMMAND_LANGUAGES:
            continue
        pending, start = "", first_line
        for number, line in enumerate(body.splitlines(), first_line):
            if language == "console":
                if not pending and not line.startswith("$ "):
                    continue  # output
                line = line.removeprefix("$ ")
            if not pending:
                start = number
            pending += line + "\n"
            if line.endswith("\\"):
                pending = pending[: -len("\\\n")] + " "
                continue
            try:
                words = _split_words(pending)
            except ValueError:
                continue  # a quotation that goes on over the next lines
            commands += _commands_of(words, f"{name}:{start}")
            pending = ""
        assert not pending.strip(), f"{name}:{start}: unfinished command {pending!r}"
    return commands


def inline_commands(text: str, name: str) -> list[Command]:
    """Commands quoted in a page's prose: `make ...`, `pix2pix ...`, `python -m ...`."""
    prose = FENCE.sub(lambda match: "\n" * match.group(0).count("\n"), text)
    commands = []
    for match in INLINE.finditer(prose):
        code = " ".join(match.group(1).split())
        first, _, rest = code.partition(" ")
        if not (first in {"make", *PIX2PIX} or (first in PYTHONS and rest.startswith("-m "))) or (
            first == "make" and code.startswith("make -")
        ):
            continue
        try:
            words = shlex.split(code)
        except ValueError:
            words = code.split(" ")
        # Prose marks optional parts with brackets and elides with "...".
        words = [word.strip("[]") for word in words if word.strip("[]") not in ("", "...")]
        if first in PYTHONS and len(words) < 3:
            continue  # `python -m ...`: no module named
        line = prose.count("\n", 0, match.start()) + 1
        commands.append(Command(f"{name}:{line} (inline)", tuple(words)))
    return commands


def commands_in(text: str, name: str) -> list[Command]:
    return fenced_commands(text, name) + inline_commands(text, name)


def _all_commands() -> list[Command]:
    return [
        command
        for page in PAGES
        for command in commands_in(page.read_text(), str(page.relative_to(ROOT)))
    ]


COMMANDS = _all_commands()


def _program(command: Command) -> str:
    return command.words[0]


# ---------------------------------------------------------------- what the code says


@cache
def makefile_targets() -> frozenset[str]:
    text = (ROOT / "Makefile").read_text()
    return frozenset(re.findall(r"^([a-z][\w-]*):(?!=)", text, re.MULTILINE))


@cache
def makefile_variables() -> frozenset[str]:
    text = (ROOT / "Makefile").read_text()
    return frozenset(re.findall(r"\$\(([A-Z_][A-Z0-9_]*)\)", text)) | frozenset(
        re.findall(r"^([A-Z_][A-Z0-9_]*)\s*[?:]?=", text, re.MULTILINE)
    )


@cache
def make_dry_run(*arguments: str) -> tuple[int, str]:
    """`make -n` with these arguments: its exit status, and its output (or its errors)."""
    completed = subprocess.run(
        ["make", "-n", "--no-print-directory", *arguments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return completed.returncode, completed.stdout if completed.returncode == 0 else completed.stderr


@cache
def help_text(*program: str) -> str:
    """`--help` of `python -m MODULE [SUBCOMMAND]`, run once per program."""
    completed = subprocess.run(
        [sys.executable, "-m", *program, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HELP_TIMEOUT_S,
    )
    assert completed.returncode == 0, f"{' '.join(program)} --help: {completed.stderr[-2000:]}"
    return completed.stdout


def _help_programs(command: Command) -> tuple[str, ...] | None:
    words = command.words
    if words[0] in PYTHONS and len(words) > 2 and words[1] == "-m":
        return (words[2],)
    if words[0] in PIX2PIX and len(words) > 1 and not words[1].startswith("-"):
        return ("pix2pix_client", words[1])
    return None


@pytest.fixture(scope="module")
def helps_in_parallel() -> None:
    """Fills the --help cache for every program the pages use, several at a time."""
    programs = {_help_programs(command) for command in COMMANDS} - {None}
    programs = {p for p in programs if importlib.util.find_spec(p[0]) is not None}
    makes = {command.words[1:] for command in COMMANDS if _program(command) == "make"}
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(_quiet_help, sorted(programs)))
        list(pool.map(lambda arguments: make_dry_run(*arguments), sorted(makes)))


def _quiet_help(program: tuple[str, ...]) -> None:
    with contextlib.suppress(AssertionError):  # reported by the command's own test
        help_text(*program)


def _flags(words: tuple[str, ...]) -> list[str]:
    return [word.split("=", 1)[0] for word in words if re.match(r"-{1,2}[A-Za-z]", word)]


def _missing_flags(words: tuple[str, ...], help_output: str) -> list[str]:
    return [
        flag
        for flag in _flags(words)
        if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_output)
    ]


@cache
def _pix2pix_commands() -> dict[str, argparse.ArgumentParser]:
    return next(
        action.choices
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )


# ---------------------------------------------------------------- the checks


def check_command(command: Command) -> list[str]:
    """What is wrong with one command: empty when it matches the code."""
    program, words = _program(command), command.words
    if Path(program).name in SKIPPED:
        return []
    if program == "make":
        return _check_make(words[1:])
    if program in PYTHONS:
        if len(words) < 3 or words[1] != "-m":
            return [f"{program} without -m MODULE: only modules are checked"]
        module = words[2]
        if importlib.util.find_spec(module) is None:
            return [f"no module {module}"]
        missing = _missing_flags(words[3:], help_text(module))
        return [f"{flag} is not a flag of python -m {module}" for flag in missing]
    if program in PIX2PIX:
        if len(words) < 2 or words[1].startswith("-"):
            return [] if words[1:] in ((), ("--help",)) else ["pix2pix: flags before the command"]
        subcommand = words[1]
        if subcommand not in _pix2pix_commands():
            return [f"pix2pix has no command {subcommand}"]
        missing = _missing_flags(words[2:], help_text("pix2pix_client", subcommand))
        return [f"{flag} is not a flag of pix2pix {subcommand}" for flag in missing]
    return [f"{program}: neither checked nor skipped (tests/test_docs.py)"]


def _check_make(arguments: tuple[str, ...]) -> list[str]:
    problems = []
    targets = [word for word in arguments if "=" not in word]
    assignments = [word.split("=", 1)[0] for word in arguments if "=" in word]
    problems += [f"no make target {t}" for t in targets if t not in makefile_targets()]
    problems += [
        f"the Makefile does not read {name}"
        for name in assignments
        if name not in makefile_variables()
    ]
    if problems:
        return problems
    returncode, output = make_dry_run(*arguments)
    if returncode != 0:
        return [f"make -n failed: {output.strip()[-500:]}"]
    # The commands the recipe would run, with the flags its variables (BENCH_FLAGS=...)
    # add: checked like the pages' own.
    for line in output.replace("\\\n", " ").splitlines():
        try:
            recipe = _commands_of(_split_words(line), "make -n")
        except ValueError:
            continue
        for command in recipe:
            if _program(command) in PYTHONS | PIX2PIX:
                problems += [f"its recipe: {p}" for p in check_command(command)]
    return problems


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_every_command_shown_matches_the_code(command: Command, helps_in_parallel: None) -> None:
    problems = check_command(command)
    assert not problems, f"{command}: " + "; ".join(problems)


def test_the_pages_show_commands_of_every_kind() -> None:
    """The reader above finds what the pages hold (a broken reader would pass anything)."""
    programs = {_program(command) for command in COMMANDS}
    assert {"make", ".venv/bin/python", "python3", "pix2pix", "docker"} <= programs
    assert len(COMMANDS) > 50


@pytest.mark.parametrize(
    ("markdown", "problem"),
    [
        ("```bash\nmake serve FLAVOR=x\n```\n", "does not read FLAVOR"),
        ("```bash\nmake serv\n```\n", "no make target serv"),
        ("```bash\n.venv/bin/python -m serving.serve \\\n    --gracee 3\n```\n", "--gracee"),
        (
            "```bash\ndocker run img bash -c '\n  python3 -m serving.demo --promt x'\n```\n",
            "--promt",
        ),
        ("Run `pix2pix edit a.png --stepz 3` to see.\n", "--stepz"),
        ("```console\n$ pix2pix edti a.png\nsome output --not-a-flag\n```\n", "no command edti"),
        ("```bash\nrm -rf build\n```\n", "neither checked nor skipped"),
        ('```bash\nmake bench BENCH_FLAGS="--round 3"\n```\n', "--round is not a flag"),
    ],
)
def test_a_drifted_command_fails(markdown: str, problem: str, helps_in_parallel: None) -> None:
    commands = commands_in(markdown, "drift.md")
    problems = [p for command in commands for p in check_command(command)]
    assert any(problem in p for p in problems), problems


def test_every_fence_names_its_language() -> None:
    """So that no shell block escapes the command check by being untagged."""
    untagged = [
        f"{page.relative_to(ROOT)}:{line}"
        for page in PAGES
        for language, _, line in _fences(page.read_text())
        if not language
    ]
    assert not untagged, f"fenced blocks without a language: {untagged}"


def test_every_python_example_compiles_and_imports_what_exists() -> None:
    """The pages' ```python blocks are valid Python, and what they import from the client
    package is there."""
    problems = []
    for page in PAGES:
        for language, body, line in _fences(page.read_text()):
            if language != "python":
                continue
            where = f"{page.relative_to(ROOT)}:{line}"
            try:
                tree = ast.parse(body, where)
            except SyntaxError as error:
                problems.append(f"{where}: {error}")
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module == "pix2pix_client":
                    module = importlib.import_module(node.module)
                    problems += [
                        f"{where}: pix2pix_client has no {alias.name}"
                        for alias in node.names
                        if not hasattr(module, alias.name)
                    ]
    assert not problems, problems


# ---------------------------------------------------------------- links and size


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    prose = FENCE.sub("", page.read_text())
    return {_slug(m) for m in re.findall(r"^#{1,6} (.+)$", prose, re.MULTILINE)}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    prose = FENCE.sub("", page.read_text())
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target}: no heading #{anchor}")
    assert not broken, broken


def test_the_readme_is_a_front_door() -> None:
    text = README.read_text()
    words = len(text.split())
    assert words <= README_WORD_LIMIT, f"README.md has {words} words (limit {README_WORD_LIMIT})"
    documentation = text.split("\n## Documentation\n", 1)[1].split("\n## ", 1)[0]
    for page in (ROOT / "docs").glob("*.md"):
        assert f"(docs/{page.name})" in documentation, f"docs/{page.name} is not linked"


# ---------------------------------------------------------------- the Parameters table


def _cli_names() -> dict[str, tuple[str, ...]]:
    """What `pix2pix edit` calls each contract input, read from its parser."""
    edit = _pix2pix_commands()["edit"]
    names: dict[str, tuple[str, ...]] = {}
    for action in edit._actions:
        name = "image" if action.dest == "inputs" else action.dest
        if name in contract.PARAMETERS_BY_NAME:
            names[name] = tuple(action.option_strings) or (str(action.metavar),)
    return names


def test_the_parameters_table_is_generated_from_the_contract() -> None:
    """client/README.md holds `contract.parameters_table()`'s output, flags from the CLI's
    own parser. To regenerate, paste the expected text of a failure between the markers."""
    text = CLIENT_README.read_text()
    assert GENERATED_START in text and GENERATED_END in text
    shown = text.split(GENERATED_START, 1)[1].split(GENERATED_END, 1)[0]
    names = _cli_names()
    assert set(names) == {parameter.name for parameter in contract.PARAMETERS}
    assert shown == contract.parameters_table(names)


def test_the_parameters_table_exists_once() -> None:
    row = "| `num_inference_steps` |"
    assert "\n## Parameters\n" not in README.read_text()
    holders = [str(page.relative_to(ROOT)) for page in PAGES if row in page.read_text()]
    assert holders == ["client/README.md"]
