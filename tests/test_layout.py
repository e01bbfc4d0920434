"""ARCHITECTURE.md's "How the code is laid out" stays true: every module is on the map, and the map names no ghost."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def layout_paths() -> set[str]:
    """The paths ARCHITECTURE.md's layout map names under ``resta_fast/``, relative to it."""
    architecture = (REPO / "ARCHITECTURE.md").read_text(encoding="utf-8")
    section = architecture.split("## How the code is laid out", 1)[1].split("\n## ", 1)[0]
    block = section.split("    resta_fast/\n", 1)[1].split("\n    tests/", 1)[0]
    names = set()
    for line in block.splitlines():  # "      io/reader.py   what it is": each line opens with the module's path
        first = line.split(maxsplit=1)[0] if line.strip() else ""
        if first.endswith(".py"):
            names.add(first)
    return names


def _defines_something(path: Path) -> bool:
    return any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) for n in ast.parse(path.read_text()).body)


def modules() -> set[str]:
    """Every module of the package but plain package markers (an ``__init__.py`` that defines no function or
    class, or only the lazy ``__getattr__``) and sub-package ``__main__.py``."""
    root = REPO / "resta_fast"
    found = set()
    for f in root.rglob("*.py"):
        rel = f.relative_to(root).as_posix()
        if f.name == "__init__.py" and (rel == "eval/__init__.py" or not _defines_something(f)):
            continue
        if f.name == "__main__.py" and rel != "__main__.py":
            continue
        found.add(rel)
    return found


def test_every_module_is_on_the_map():
    missing = sorted(modules() - layout_paths())
    assert not missing, f"add these to ARCHITECTURE.md's 'How the code is laid out': {missing}"


def test_the_map_names_only_modules_that_exist():
    ghosts = sorted(p for p in layout_paths() if not (REPO / "resta_fast" / p).is_file())
    assert not ghosts, f"ARCHITECTURE.md's layout names modules that do not exist: {ghosts}"


def test_the_map_is_read():
    assert {"api.py", "io/reader.py", "eval/judges/refusal.py", "verify/samples.py"} <= layout_paths()
