"""The analysis modules each `selfref` verb runs: a static import closure (every `import analysis...`, also inside
functions) from the verb's module in analysis/verbs, and the package folders dvc.yaml lists for it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "analysis"


def module_file(name: str) -> Path:
    """analysis.a.b -> analysis/a/b.py (or its package __init__.py)."""
    path = REPO.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _imports(tree: ast.AST) -> set[str]:
    """analysis.* modules imported anywhere in one syntax tree."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "analysis"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "analysis":
            for alias in node.names:  # `from analysis import x` may name a module
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if module_file(candidate).exists() else node.module)
    return found


def imported_modules(path: Path) -> set[str]:
    """analysis.* modules imported anywhere in one file."""
    return _imports(ast.parse(path.read_text(encoding="utf-8")))


def _is_verb(node: ast.stmt) -> bool:
    """A function of cli.py registered as a typer command (`@app.command()`, `@suite_app.command("use")`)."""
    return isinstance(node, ast.FunctionDef) and any(
        isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr == "command"
        for d in node.decorator_list)


def closure(start: str, skip_prefix: str | None = None, imports: set[str] | None = None) -> set[str]:
    """Every analysis module `start` runs, itself included; `skip_prefix` modules are not followed;
    `imports`, if given, replaces what `start` itself imports."""
    seen, todo = {start}, sorted(imports if imports is not None else imported_modules(module_file(start)))
    while todo:
        name = todo.pop()
        if name in seen or (skip_prefix and name.startswith(skip_prefix)):
            continue
        seen.add(name)
        todo.extend(imported_modules(module_file(name)))
    return seen


def document_modules(qmd: Path) -> set[str]:
    """analysis.* modules the report document's Python cells import (they run in the report stage too)."""
    text = qmd.read_text(encoding="utf-8")
    found = set()
    for name, names in re.findall(r"^\s*from (analysis[\w.]*) import ([\w, ]+)", text, re.M):
        for alias in names.split(","):
            candidate = f"{name}.{alias.strip()}"
            found.add(candidate if module_file(candidate).exists() else name)
    found |= set(re.findall(r"^\s*import (analysis[\w.]*)", text, re.M))
    return found


def stage_modules(verb: str) -> set[str]:
    """analysis.* modules one verb's stage runs: the closure of analysis.verbs.<verb>, and for the report also
    of the modules the document imports."""
    names = closure(f"analysis.verbs.{verb}")
    if verb == "report":
        for name in document_modules(REPO / "report" / "index.qmd"):
            names |= closure(name)
    return names


# The CLI only parses arguments and calls the verb module, and the launcher only finds the environment: neither is
# a dependency of any stage, so editing them re-runs nothing (README, "The pipeline").
WIRING = {"analysis", "analysis.cli", "analysis.verbs"}


def stage_dependencies(verb: str) -> list[str]:
    """What dvc.yaml lists for a verb's stage: the folder of every library package its modules belong to, and
    the verb's own module (the other verbs are no dependency)."""
    deps = set()
    for name in stage_modules(verb) - WIRING:
        parts = name.split(".")
        if parts[1] == "verbs":
            deps.add(str(module_file(name).relative_to(REPO)))
        else:
            deps.add(f"analysis/{parts[1]}")
    return sorted(deps)


if __name__ == "__main__":
    for verb in ("prompts_check", "extract", "stats", "patch", "original", "figures", "report", "probe"):
        print(verb, stage_dependencies(verb))
