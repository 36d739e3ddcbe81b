"""The engine stays pure: no Ray or W&B imports, no environment variables, no YAML in anomaly_core/."""

import ast

import pytest

from .conftest import REPO

ENGINE_FILES = sorted((REPO / "anomaly_core").rglob("*.py"))
FORBIDDEN_MODULES = {"ray", "wandb", "yaml"}


@pytest.mark.parametrize("path", ENGINE_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_engine_module_is_pure(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            names = []
        for name in names:
            assert name.split(".")[0] not in FORBIDDEN_MODULES, f"{path.name} imports {name}"
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
            pytest.fail(f"{path.name} reads environment variables (line {node.lineno})")
