"""Every third-party package the shipped code imports is a core dependency, not only a test extra:
`bash scripts/serve.sh` installs the core alone (httpx once slipped through as a test-only package)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("app", "models", "index")


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def _installed_with(names: set[str]) -> set[str]:
    """``names`` and what they require in turn (their own extras aside): what installing them brings."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            needs = requires(name) or []
        except PackageNotFoundError:
            continue
        todo.extend(_name(r) for r in needs if "extra ==" not in r)
    return seen


def _imports(tree: ast.Module) -> tuple[set[str], set[str]]:
    """(top-level modules imported when the module loads, those imported only inside a function)."""
    eager: set[str] = set()
    lazy: set[str] = set()
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            inside.update(id(n) for n in ast.walk(node) if n is not node)
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.split(".")[0]]
        (lazy if id(node) in inside else eager).update(names)
    return eager, lazy


def test_shipped_code_imports_only_core_dependencies() -> None:
    """A module-level import must be a core dependency; one inside a function (an optional feature,
    e.g. pymilvus for CXR_REID_VECTOR_URL) may instead come from an extra that pyproject declares, and
    the code then says which extra to install when it is missing."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = _installed_with({_name(r) for r in project["dependencies"]})
    extras = {
        _name(r)
        for name, reqs in project.get("optional-dependencies", {}).items()
        if name != "test"
        for r in reqs
    }
    optional = _installed_with(extras) | core
    distributions = packages_distributions()
    eager: set[str] = set()
    lazy: set[str] = set()
    for package in SHIPPED:
        for path in (ROOT / package).rglob("*.py"):
            e, lz = _imports(ast.parse(path.read_text(encoding="utf-8")))
            eager |= e
            lazy |= lz
    skip = set(sys.stdlib_module_names) | set(SHIPPED) | {"__future__"}

    def dists(module: str) -> set[str]:
        return {d.lower().replace("_", "-") for d in distributions.get(module, [module])}

    missing = {m: sorted(dists(m)) for m in sorted(eager - skip) if not dists(m) & core}
    missing |= {m: sorted(dists(m)) for m in sorted(lazy - eager - skip) if not dists(m) & optional}
    assert not missing, f"imported by the shipped code but not core dependencies: {missing}"
