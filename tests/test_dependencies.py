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


def test_shipped_code_imports_only_core_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = _installed_with({_name(r) for r in project["dependencies"]})
    distributions = packages_distributions()
    imported: set[str] = set()
    for package in SHIPPED:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    imported.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - set(SHIPPED) - {"__future__"}
    missing = {
        module: [d.lower() for d in distributions.get(module, [module])]
        for module in sorted(third_party)
        if not {d.lower().replace("_", "-") for d in distributions.get(module, [module])} & core
    }
    assert not missing, f"imported by the shipped code but not core dependencies: {missing}"
