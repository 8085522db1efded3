"""The node tool and the lab are two wings with two doors: nothing on the node's side
imports the lab (the image test checks that the node's image holds none of it)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NODE = REPO / "tcbypass"


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_no_node_module_imports_the_lab():
    offenders = {str(path.relative_to(REPO)): sorted(m for m in imported_modules(path)
                                                     if m == "tcbypass_lab" or m.startswith("tcbypass_lab."))
                 for path in sorted(NODE.rglob("*.py"))}
    assert not {k: v for k, v in offenders.items() if v}, "the node tool must not reach into the lab"
    assert not (NODE / "lab").exists(), "the lab lives in lab/tcbypass_lab, its own distribution"


def test_the_scanner_sees_an_import_of_the_lab(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nfrom tcbypass_lab.sandbox import Sandbox\nfrom . import x\n")
    assert imported_modules(probe) == {"os", "tcbypass_lab.sandbox"}
