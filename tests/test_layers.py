"""The top-level packages form layers, with no import cycle between them:

    ldm  <-  export  <-  server  <-  bench

(each may import the ones to its left, never one to its right). Imports inside functions
count too, and no package reaches another through importlib or getattr probing.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("ldm", "export", "server", "bench")


def imported_packages(path: Path) -> set[str]:
    """Top-level packages `path` imports, wherever in the file the import is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant)):
            found.add(str(node.args[0].value).split(".")[0])
    return found


@pytest.mark.parametrize("package", LAYERS)
def test_a_package_imports_only_the_layers_below_it(package):
    above = set(LAYERS[LAYERS.index(package) + 1:])
    wrong = {str(p.relative_to(ROOT)): sorted(imported_packages(p) & above)
             for p in sorted((ROOT / package).rglob("*.py"))}
    assert {k: v for k, v in wrong.items() if v} == {}


def test_the_check_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from server.repository import assemble\n"
                 "    import importlib\n    importlib.import_module('bench.run')\n")
    assert imported_packages(f) == {"server", "importlib", "bench"}
