"""The library (``groundup/{text,model,train,weights,instruct}``) stands on its own: it imports neither the
orchestration layer (Prefect, flows, tasks), nor MLflow or the tracking gateway, nor the CLI. ``model/``
also knows nothing of the pydantic settings or the process environment: it takes plain arguments."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "groundup"
LIBRARY = ("text", "model", "train", "weights", "instruct")
ORCHESTRATION = (
    "prefect", "mlflow", "groundup.cli", "groundup.tasks", "groundup.flows", "groundup.tracking",
    "groundup.environment", "groundup.serving",
)  # fmt: skip
SETTINGS = ("groundup.config", "pydantic")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module an ``import`` statement in ``path`` names, at any depth (function-level imports too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)]
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def violations(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
        for path in sorted((PACKAGE / folder).rglob("*.py"))
        for line, name in imported_modules(path)
        if any(name == banned or name.startswith(banned + ".") for banned in forbidden)
    ]


@pytest.mark.parametrize("folder", LIBRARY)
def test_the_library_imports_no_orchestration_tracking_or_cli(folder):
    assert violations(folder, ORCHESTRATION) == []


def test_the_model_layer_takes_plain_arguments():
    assert violations("model", SETTINGS) == []


def test_the_walk_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from groundup import tracking\n    import mlflow.client\n")
    assert imported_modules(module) == [(2, "groundup"), (2, "groundup.tracking"), (3, "mlflow.client")]


def test_every_package_folder_is_in_the_wheel():
    """pyproject lists the packages explicitly (flows/ and tasks/ map into groundup): a new subpackage that is
    not listed is missing from a wheel install while editable installs still work (tests/test_wheel.py
    shows it too, in minutes; this says it at once)."""
    import tomllib

    root = Path(__file__).resolve().parent.parent
    settings = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    listed = set(settings["packages"])
    roots = {package: root / folder for package, folder in settings["package-dir"].items()}
    found = set()
    for package, folder in roots.items():
        for init in folder.rglob("__init__.py"):
            relative = init.parent.relative_to(folder).parts
            found.add(".".join((package, *relative)))
    assert found - listed == set(), f"packages missing from pyproject's [tool.setuptools] packages: {sorted(found - listed)}"
