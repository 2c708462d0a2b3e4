"""docs/architecture.md's map, checked: the packages of experiments/ import in one direction, and
no command imports another command."""
import ast
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"

#: Each library package and the packages of experiments/ it may import (the map's layers).
LAYERS = ["common", "data", "train", "report", "cifar", "ensembles|airbench|transfer|jax",
          "benchmarks", "catalog"]


def _layer(package: str) -> int:
    for i, names in enumerate(LAYERS):
        if package in names.split("|"):
            return i
    raise AssertionError(f"experiments/{package}/ is in no layer of docs/architecture.md's map")


def _imported_packages(path: Path, package: str | None) -> set[str]:
    """The experiments packages (or command modules) a file imports, relative or absolute."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and (node.module or "").startswith("experiments."):
                found.add(node.module.split(".")[1])
            elif node.level == 1 and package is None and node.module:   # a command: .x
                found.add(node.module.split(".")[0])
            elif node.level == 2 and node.module:                        # a library module: ..x
                found.add(node.module.split(".")[0])
            elif node.level == 1 and package is not None:
                found.add(package)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("experiments."):
                    found.add(alias.name.split(".")[1])
    return found


LIBRARY = sorted(p for p in EXPERIMENTS.iterdir() if p.is_dir() and (p / "__init__.py").exists())
COMMANDS = sorted(p.stem for p in EXPERIMENTS.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("package", [p.name for p in LIBRARY])
def test_a_library_package_imports_only_the_layers_below_it(package):
    mine = _layer(package)
    for path in (EXPERIMENTS / package).rglob("*.py"):
        for other in _imported_packages(path, package):
            assert other not in COMMANDS, f"{path} imports the command experiments.{other}"
            assert _layer(other) < mine or other == package, (
                f"{path.relative_to(EXPERIMENTS.parent)} imports experiments.{other}, which is not "
                f"below experiments.{package} in docs/architecture.md's map")


@pytest.mark.parametrize("command", COMMANDS)
def test_a_command_imports_the_library_and_no_other_command(command):
    for other in _imported_packages(EXPERIMENTS / f"{command}.py", None):
        assert other not in COMMANDS, f"experiments.{command} imports the command experiments.{other}"
