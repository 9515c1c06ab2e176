"""The service's shape holds: core and model load without the web stack, no layer below http
imports it, functions and classes stay small, and the README's Layout names every module."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "service" / "crossrank"
BELOW_HTTP = ("core", "model", "features", "ops")
WEB = ("fastapi", "starlette", "uvicorn")
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 250
# Flat lists of declarations, not logic a reader must follow: every metric series in a row.
DECLARATIONS = {"ops/metrics.py:Metrics.__init__"}


def modules(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (PACKAGE / folder).glob("*.py"))


def dotted(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def test_core_and_model_load_no_web_module() -> None:
    names = [dotted(p) for p in modules(*BELOW_HTTP)]
    probe = (
        f"import importlib, sys\nfor name in {names!r}: importlib.import_module(name)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {WEB!r}))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert loaded.strip() == "[]", loaded
    assert len(names) > 20  # the walk found the layers


def imported(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_no_module_below_http_imports_the_http_layer_or_the_web() -> None:
    for path in modules(*BELOW_HTTP):
        for name in imported(path):
            assert not name.startswith("crossrank.http"), f"{path.name} imports {name}"
            assert name.split(".")[0] not in WEB, f"{path.name} imports {name}"


def test_model_and_ops_do_not_reach_up_into_core_or_features() -> None:
    for path in modules("model", "ops"):
        for name in imported(path):
            assert not name.startswith(("crossrank.core", "crossrank.features")), (
                f"{path.relative_to(PACKAGE)} imports {name}"
            )


def spans(path: Path) -> list[tuple[str, str, int]]:
    """(kind, qualified name, lines) of every class and function in a module."""
    out = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                name = prefix + child.name
                kind = "class" if isinstance(child, ast.ClassDef) else "function"
                assert child.end_lineno is not None
                out.append((kind, name, child.end_lineno - child.lineno + 1))
                visit(child, name + ".")

    visit(ast.parse(path.read_text()), "")
    return out


def test_functions_and_classes_stay_small() -> None:
    for path in PACKAGE.rglob("*.py"):
        where = path.relative_to(PACKAGE).as_posix()
        for kind, name, lines in spans(path):
            if f"{where}:{name}" in DECLARATIONS:
                continue
            bound = MAX_CLASS_LINES if kind == "class" else MAX_FUNCTION_LINES
            assert lines < bound, f"{where}:{name} is {lines} lines"


def test_the_readme_layout_names_every_module_and_nothing_else() -> None:
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("```")[1]
    listed: set[str] = set()
    folder = None
    for line in layout.splitlines():
        entry = re.match(r"  (\S+)\s+(.*)", line)  # a folder or module of the package
        if entry:
            name, line = entry.groups()
            if name.endswith(".py"):
                listed.add(name.removesuffix(".py"))
                folder = None
                continue
            folder = name.rstrip("/")
        elif not line.startswith("   "):
            folder = None  # past the package's entries
        if folder is None:
            continue
        for word in re.sub(r"\([^)]*\)?|^[^(]*\)", "", line).split(","):
            if word.strip():
                listed.add(f"{folder}/{word.strip()}")
    actual = {
        p.relative_to(PACKAGE).with_suffix("").as_posix()
        for p in PACKAGE.rglob("*.py")
        if p.name != "__init__.py"
    }
    assert listed == actual
