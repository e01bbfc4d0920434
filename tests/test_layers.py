"""The layers are contracts a tool checks: import-linter runs pyproject.toml's [tool.importlinter] here.

grimp, which builds import-linter's graph, reads every import statement, function-level and under
TYPE_CHECKING included, so moving an import into a function does not get it past a contract. The
map of the layers and why each exception is one is in ARCHITECTURE.md ("The one-way flow").
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from importlinter.api import read_configuration

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
# import-linter's own command line, on this interpreter; --no-cache: nothing written into the repository.
LINT = [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"]


def lint(root: Path) -> subprocess.CompletedProcess:
    """import-linter over the ``resta_fast`` package found first on the path from ``root``, with our contracts."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [*LINT, "--no-cache", "--no-logo", str(PYPROJECT)], cwd=root, env=env, capture_output=True, text=True
    )


def contracts() -> dict[str, dict]:
    return {c["id"]: c for c in read_configuration(str(PYPROJECT))["contracts_options"]}


def layer_modules() -> set[str]:
    """Every module the flow contract names ("a | b" and "a : b" are several modules in one layer)."""
    names = set()
    for layer in contracts()["flow"]["layers"]:
        for part in layer.replace("|", ":").split(":"):
            names.add(part.strip().strip("()"))
    return names


def package_modules() -> list[str]:
    """Every module of resta_fast/ but package markers (``__init__.py``), as dotted names."""
    root = REPO / "resta_fast"
    return sorted(
        ".".join(("resta_fast", *f.relative_to(root).with_suffix("").parts))
        for f in root.rglob("*.py")
        if f.name != "__init__.py"
    )


def test_the_contracts_hold():
    proc = lint(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"Contracts: {len(contracts())} kept, 0 broken" in proc.stdout, proc.stdout


def test_every_module_has_a_layer():
    """A new module is placed, the way ARCHITECTURE.md's map names it (tests/test_layout.py): a module
    in no layer would escape the flow contract. Named itself, or inside a package that is a layer."""
    named = layer_modules()
    unplaced = [m for m in package_modules() if not any(m == n or m.startswith(n + ".") for n in named)]
    assert not unplaced, f"give these a layer in pyproject.toml's flow contract: {unplaced}"


def test_the_eval_extra_contract_names_every_top_level_module_but_eval_and_demo():
    top = {".".join(m.split(".")[:2]) for m in package_modules()}
    expected = top - {"resta_fast.eval", "resta_fast.demo"}
    sources = set(contracts()["eval-extra"]["source_modules"])
    assert sources == expected, f"add or drop in the eval-extra contract: {sorted(sources ^ expected)}"


def test_a_forbidden_import_breaks_them(tmp_path):
    """The check can fail: a copy of the package with an upward import, hidden in a function the way
    circles used to be dodged, is refused, and the report names the import and its line."""
    shutil.copytree(REPO / "resta_fast", tmp_path / "resta_fast", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    reader = tmp_path / "resta_fast" / "io" / "reader.py"
    source = reader.read_text()
    reader.write_text(source + "\n\ndef _planted():\n    from resta_fast import api  # io may not import api\n")
    proc = lint(tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "resta_fast.io is not allowed to import resta_fast.api" in proc.stdout, proc.stdout
    line = source.count("\n") + 4
    assert f"resta_fast.io.reader -> resta_fast.api (l.{line})" in proc.stdout, proc.stdout
