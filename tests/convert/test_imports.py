"""The conversion modules import one another in one direction only (no module imports one that imports it
back), counting imports inside functions too."""

import ast
from pathlib import Path

import jaxllm

PACKAGE = Path(jaxllm.__file__).parent / "convert"


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_conversion_modules_have_no_import_cycle():
    modules = {f"jaxllm.convert.{p.stem}": p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    edges = {m: sorted(_imports(p) & set(modules) - {m}) for m, p in modules.items()}
    assert edges["jaxllm.convert.hf"] and edges["jaxllm.convert.peft"]  # the walk sees imports at all

    def visit(module, stack):
        assert module not in stack, f"import cycle: {' -> '.join([*stack, module])}"
        for other in edges[module]:
            visit(other, [*stack, module])

    for module in modules:
        visit(module, [])
