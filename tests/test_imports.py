"""The library's shape: no import cycles in src/cmft (between modules, and between its packages), every registered task
fulfils the task contract, and no task switch outside src/cmft/tasks/."""

from __future__ import annotations

import ast
import re

from tests.conftest import REPO

SRC = REPO / "src"
TASK_NAMES = ("ner", "icd_coding", "note_classification", "retrieval", "encoder")
LAYERS = ("cmft.tasks", "cmft.finetuning", "cmft.inference", "cmft.evaluation", "cmft.pretraining", "cmft.serving",
          "cmft.predicting")  # fmt: skip


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


def _module_graph() -> dict[str, set[str]]:
    """Each cmft module → the cmft modules it imports, at module level or inside a function."""
    files = {_module_name(path): path for path in SRC.rglob("*.py")}
    modules = set(files)
    return {name: _imports(ast.parse(path.read_text(encoding="utf-8")), name, modules)
            for name, path in files.items()}  # fmt: skip


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
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
    return cycles


def test_no_import_cycles():
    graph = _module_graph()
    assert len(graph) > 40 and graph["cmft.finetuning.engine"]  # the walk sees the real library
    assert _cycles(graph) == []


def _package(module: str) -> str:
    """A module's first-level package (or module) under cmft: cmft.tasks.ner → cmft.tasks."""
    return ".".join(module.split(".")[:2])


def test_no_import_cycles_between_packages():
    """Map every module to its first-level package under cmft (cmft.tasks, cmft.finetuning, cmft.inference, …): no
    cycle between them, imports inside functions included. The package root (cmft/__init__.py, the public names)
    is left out: every module is below it."""
    packages: dict[str, set[str]] = {}
    why: dict[tuple[str, str], str] = {}
    for module, imported in _module_graph().items():
        for target in imported:
            source, goal = _package(module), _package(target)
            if "cmft" not in (source, goal) and source != goal:
                packages.setdefault(source, set()).add(goal)
                why.setdefault((source, goal), f"{module} imports {target}")
    assert set(LAYERS) <= set(packages)  # the walk sees the packages named in the architecture
    names = set(packages).union(*packages.values())
    cycles = _cycles({name: packages.get(name, set()) for name in names})
    assert [[why[pair] for pair in zip(cycle, cycle[1:], strict=False)] for cycle in cycles] == []


def test_every_registered_task_fulfils_the_contract():
    """Each registered class implements the abstract core and names its recipe section; the recipe's keys come from
    them."""
    import inspect

    from cmft.finetuning.config import TASKS, RecipeConfig
    from cmft.recipe import TaskSection
    from cmft.tasks import REGISTRY, recipe_tasks, task_class
    from cmft.tasks.base import Task

    for name in REGISTRY:
        task = task_class(name)
        assert issubclass(task, Task) and not inspect.isabstract(task) and task.name == name
        assert isinstance(task.metric_for_best, str) and isinstance(task.section_name, str)
    assert tuple(task.name for task in recipe_tasks()) == TASKS
    for task in recipe_tasks():
        assert issubclass(task.section, TaskSection) and task.section.__module__ == task.__module__
        assert RecipeConfig.model_fields[task.section_name].default is None


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
