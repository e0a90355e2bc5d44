"""The data layer never imports the model or method layers (DESIGN.md: they share only tokens.py)."""

import ast
from pathlib import Path

import lightning_moe.data

FORBIDDEN = ("lightning_moe.models", "lightning_moe.methods")


def test_data_layer_imports_neither_models_nor_methods():
    package = Path(lightning_moe.data.__file__).parent
    for file in package.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom):
                # resolve relative imports ("from ..models import x") against lightning_moe.data
                base = "lightning_moe.data".rsplit(".", node.level - 1)[0] if node.level else ""
                names = [f"{base}.{node.module}" if base and node.module else base or node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            assert not any(n.startswith(FORBIDDEN) for n in names), f"{file.name} imports {names}"
