"""The library's shape: no import cycles in src/cmft, and no task switch outside src/cmft/tasks/."""

from __future__ import annotations

import ast
import re

from tests.conftest import REPO

SRC = REPO / "src"
TASK_NAMES = ("ner", "icd_coding", "note_classification", "retrieval", "encoder")


def _module_name(path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.Module, name: str, modules: set[str]) -> set[str]:
    """cmft modules that `name` imports, at module level or inside a function (a deferred import is a dependency
    all the same)."""
    found: set[str] = set()
    package = name if (SRC / name.replace(".", "/") / "__init__.py").is_file() else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in modules else base)
    return {module for module in found if module in modules and module != name}


def test_no_import_cycles():
    files = {_module_name(path): path for path in SRC.rglob("*.py")}
    modules = set(files)
    graph = {name: _imports(ast.parse(path.read_text(encoding="utf-8")), name, modules)
             for name, path in files.items()}  # fmt: skip
    assert len(graph) > 40 and graph["cmft.finetuning.engine"]  # the walk sees the real library
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                cycles.append([*path[path.index(child) :], child] if child in path else [node, child])
            elif child not in state:
                visit(child, [*path, child])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_nothing_outside_tasks_compares_task_names():
    names = "|".join(TASK_NAMES)
    comparison = re.compile(rf"""(==|!=|\bin)\s*\(?\s*["']({names})["']|["']({names})["']\s*(==|!=)""")
    offenders = []
    for path in sorted((SRC / "cmft").rglob("*.py")):
        if "tasks" in path.relative_to(SRC / "cmft").parts:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if comparison.search(line) or re.search(r"hasattr\(\s*(self\.)?task", line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []
