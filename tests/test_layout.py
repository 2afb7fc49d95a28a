"""The project's rooms and the direction of their imports, read from the code itself.

Every import of every module is read with `ast` (those inside functions too): no module
may reach itself through its imports, and a room imports only the rooms below it:

    serving, benchmarks, deploy, training
      -> model_repository  (build time: what gets written)
        -> edit_pipeline   (runs inside tritonserver)
          -> export, pix2pix_client

The README's layout section names every room and top-level module that exists.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Where each room's package lives, and the rooms it may import.
ROOMS = {
    "pix2pix_client": (ROOT / "client" / "pix2pix_client", set()),
    "export": (ROOT / "export", set()),
    "edit_pipeline": (ROOT / "edit_pipeline", {"export", "pix2pix_client"}),
    "model_repository": (
        ROOT / "model_repository",
        {"edit_pipeline", "export", "pix2pix_client"},
    ),
    "serving": (
        ROOT / "serving",
        {"model_repository", "edit_pipeline", "export", "pix2pix_client"},
    ),
    "benchmarks": (
        ROOT / "benchmarks",
        {"serving", "model_repository", "edit_pipeline", "export", "pix2pix_client"},
    ),
    "deploy": (ROOT / "deploy", {"serving", "model_repository", "pix2pix_client"}),
    "training": (ROOT / "training", {"export"}),
}


def _module_name(room: str, path: Path) -> str:
    relative = path.relative_to(ROOMS[room][0]).with_suffix("")
    parts = [room, *relative.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(room, path): path
        for room, (folder, _) in ROOMS.items()
        for path in folder.rglob("*.py")
    }


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The project's modules that `module` imports (the longest known name of each)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from package import module` needs the module; `from module import name`
            # the module.
            names = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                for alias in node.names
            ]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_no_module_reaches_itself_through_its_imports(graph: dict[str, set[str]]) -> None:
    cycles = []
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycles.append(" -> ".join([*path[path.index(module) :], module]))
            return
        if module in done:
            return
        for imported in sorted(graph[module]):
            visit(imported, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert not cycles, "\n".join(cycles)


def test_rooms_import_only_the_rooms_below_them(graph: dict[str, set[str]]) -> None:
    wrong = []
    for module, imported in graph.items():
        room = module.split(".")[0]
        allowed = ROOMS[room][1] | {room}
        wrong += [
            f"{module} imports {name}" for name in imported if name.split(".")[0] not in allowed
        ]
    assert not wrong, "\n".join(sorted(wrong))


def test_the_readme_layout_names_every_room() -> None:
    layout = (ROOT / "README.md").read_text().split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    folders = {room: folder for room, (folder, _) in ROOMS.items()}
    for room, folder in folders.items():
        assert f"{folder.relative_to(ROOT).parts[0]}/" in layout, room
    named = set()
    for line in layout.splitlines():
        word = line.strip().split(" ")[0]
        if word.endswith(".py") or word.endswith("/"):
            named.add(word)
    for room, folder in folders.items():
        for path in folder.glob("*.py"):
            if path.name != "__init__.py" and room in (
                "edit_pipeline",
                "serving",
                "model_repository",
            ):
                assert path.name in named, f"{path.relative_to(ROOT)} is not in the layout"
