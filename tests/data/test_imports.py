"""No module of jaxllm.data imports one that imports it back, at the top or inside a function."""

import ast
from pathlib import Path

import jaxllm.data

PACKAGE = Path(jaxllm.data.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    """Every jaxllm module `path` imports anywhere in its body (`from jaxllm.data import x` counts as
    importing `jaxllm.data.x` when x is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("jaxllm.")}


def test_data_modules_do_not_import_each_other():
    modules = {f"jaxllm.data.{p.stem}": p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    imports = {name: _imported_modules(path) & set(modules) for name, path in modules.items()}
    assert "jaxllm.data.readers" in imports["jaxllm.data.hub_sources"]  # the walk sees imports at all
    mutual = sorted((a, b) for a in imports for b in imports[a] if a < b and a in imports[b])
    assert not mutual, f"modules that import each other: {mutual}"
