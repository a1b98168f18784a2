"""The package's layout is its pipeline: every module imports only its own layer and those below it (no circles),
function-level imports included, as README's Layout section says."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "verify"
# Layers from the bottom; a module may import from its own layer and any below.
LAYERS = ["errors", "models", "maths", "files", "implementations", "checks", "bench", "present", "commands"]
PUBLIC = {"planted": "implementations", "testing": "checks", "pytest_plugin": "checks", "suite": "checks",
          "cli": "commands", "__init__": "errors"}


def _layer(module: str) -> int:
    """verify.<top>... -> the index of its layer."""
    top = module.split(".")[1] if module.count(".") else "__init__"
    return LAYERS.index(PUBLIC.get(top, top))


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "verify":
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "verify" else [node.module]
            found.update(n for n in names if n != "verify.__version__")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "verify")
    return found


MODULES = sorted(p for p in ROOT.rglob("*.py") if "suite" not in p.parts or p.name != "test_candidate.py")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_a_module_imports_no_layer_above_its_own(path):
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    module = ".".join(parts)
    above = sorted(m for m in _imports(path) if m.startswith("verify.") and _layer(m) > _layer(module))
    assert not above, f"{module} (layer {LAYERS[_layer(module)]}) imports {above}"


def test_every_subpackage_says_what_it_holds_and_what_it_may_import():
    for layer in LAYERS[1:]:
        doc = ast.get_docstring(ast.parse((ROOT / layer / "__init__.py").read_text()))
        assert doc and "import" in doc.lower(), layer


def _runs_implementations(path: Path) -> list[str]:
    """The calls in `path` that build an implementation (`.make(`) or count its fused calls (`count_calls`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name == "count_calls" or (name == "make" and isinstance(node.func, ast.Attribute)):
                found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {name}")
    return found


def test_only_the_runner_builds_and_counts_implementations():
    """One runner for every check (issue #23): outside verify.checks.runner no module calls an Implementation's
    `.make(` or `count_calls`; each check builds and runs its implementations through the runner."""
    runner = ROOT / "checks" / "runner.py"
    assert _runs_implementations(runner), "the runner no longer builds or counts: update this test"
    elsewhere = [call for path in MODULES if path != runner for call in _runs_implementations(path)]
    assert not elsewhere, "\n".join(elsewhere)
