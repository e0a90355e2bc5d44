"""Every rule of the layering (docs/architecture.md: who may import whom), checked two ways.

- `layers/` imports only torch (and the standard library);
- `models/` never imports Lightning or `methods/`;
- `data/` never imports `models/` or `methods/`;
- `inference/` never imports Lightning, `data/`, `metrics/` or `methods/`;
- `modalities/` (the modality registry, below both `data/` and `models/`) imports neither, nor Lightning;
and, from the same diagram, none of these (nor `tokens.py`, which data/ and models/ share) imports the
command layers above them (`cli`, `edge`, `callbacks`, `experiments`).

1. By AST, over every file of each package (subpackages included) and every package module those
   files reach through their imports (so `data/` importing a helper that imports `models/` fails
   too): `import x`, `from x import y`, relative imports resolved against the file's own package
   (`from .. import data` is `lightning_moe.data`, `from ...models import X` in a subpackage is
   `lightning_moe.models`), and `importlib.import_module("...")` / `__import__("...")` with a
   literal name. This sees imports inside functions, which a fresh import does not run.
2. By importing `layers/` (the strictest rule: nothing but torch) and `inference/` (the largest set
   of forbidden neighbours) in a fresh interpreter and reading `sys.modules`: this also sees what
   third-party imports pull in. (models/ and data/ import only allowed third-party packages, which
   the AST check covers; a fresh transformers or Lightning import costs seconds of suite time each.)
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_moe
from tests.conftest import built_once

PACKAGE = Path(lightning_moe.__file__).parent
LIGHTNING = ("lightning", "pytorch_lightning", "lightning_fabric", "lightning_utilities", "torchmetrics")
COMMANDS = ("lightning_moe.cli", "lightning_moe.edge", "lightning_moe.export", "lightning_moe.callbacks",
            "lightning_moe.experiments")


def _pkg(name: str) -> str:
    return f"lightning_moe.{name}"


# what each part may not import (a module matches an entry if it is it or lies inside it)
FORBIDDEN = {
    "models": (*LIGHTNING, _pkg("methods"), *COMMANDS),
    "data": (_pkg("models"), _pkg("methods"), *COMMANDS),
    "inference": (*LIGHTNING, _pkg("data"), _pkg("metrics"), _pkg("methods"), *COMMANDS),
    "tokens": (*LIGHTNING, _pkg("data"), _pkg("models"), _pkg("methods"), *COMMANDS),
    "modalities": (*LIGHTNING, _pkg("data"), _pkg("models"), _pkg("methods"), *COMMANDS),
    # the export command works on models/ (a .ckpt through models' loader), never on a LightningModule
    "export": (*LIGHTNING, _pkg("methods"), _pkg("data"), _pkg("metrics"), _pkg("cli"), _pkg("edge"),
               _pkg("callbacks"), _pkg("experiments")),
}
STDLIB = set(sys.stdlib_module_names) | {"__future__"}


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _module_of(file: Path) -> str:
    parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(file: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in `file`, relative ones resolved."""
    module = _module_of(file)
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            found.append((node.lineno, base))
            if base == "lightning_moe" or base.startswith("lightning_moe."):
                # `from .. import data` imports the submodule lightning_moe.data (a plain name: an attribute)
                found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                name = node.args[0].value
                if name.startswith(".") and len(node.args) > 1:  # import_module(".x", package) is rare; resolve simply
                    name = package + name
                found.append((node.lineno, name))
    return found


def _files(part: str) -> list[Path]:
    path = PACKAGE / part
    return sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]


def _module_file(name: str) -> Path | None:
    """The file of package module `name` (a package's __init__.py), None if `name` is not one."""
    path = PACKAGE.parent.joinpath(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def _modules_run_by(name: str) -> list[str]:
    """The package modules that importing `name` runs: the longest prefix that is a module (`from
    lightning_moe.models import MultimodalLM` names an attribute) and every package above it."""
    parts = name.split(".")
    while parts and _module_file(".".join(parts)) is None:
        parts.pop()
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _forbidden(part: str, name: str) -> bool:
    if part != "layers":
        return _within(name, FORBIDDEN[part])
    if name == "lightning_moe" or name.startswith("lightning_moe."):
        return not (name == "lightning_moe" or _within(name, ("lightning_moe.layers",)))
    return name.split(".")[0] not in STDLIB | {"torch"}


def _violations(part: str) -> list[str]:
    """Every forbidden import of `part`'s files and of every package module they reach through
    package imports (lazy ones included), each with the chain of imports that reaches it."""
    chain = {_module_of(f): _module_of(f) for f in _files(part)}
    chain.update({name: f"{name} (runs first)" for name in _modules_run_by(_pkg(part))[:-1]})  # lightning_moe/__init__
    queue, out = list(chain), []
    while queue:
        module = queue.pop()
        file = _module_file(module)
        for line, name in imported_modules(file):
            ours = name == "lightning_moe" or name.startswith("lightning_moe.")
            target = _modules_run_by(name)[-1] if ours else name  # `from x import Name`: the module x
            if _forbidden(part, target):
                out.append(f"{chain[module]} ({file.relative_to(PACKAGE.parent)}:{line}) imports {target}")
            elif ours:  # follow it: what it imports is imported too (not past a violation, reported once)
                for reached in _modules_run_by(name):
                    if reached not in chain:
                        chain[reached] = f"{chain[module]} -> {reached}"
                        queue.append(reached)
    return sorted(set(out))


@pytest.mark.parametrize("part", ["layers", "models", "data", "inference", "tokens", "modalities"])
def test_nothing_a_layer_reaches_imports_what_it_may_not_even_lazily(part):
    assert _files(part) and all(f.is_file() for f in _files(part))  # the rule checks real files
    assert _violations(part) == []


def test_the_ast_check_resolves_every_import_form(tmp_path, monkeypatch):
    """The check itself: each way of writing a forbidden import is seen (a file placed in a fake package)."""
    fake = tmp_path / "lightning_moe"
    (fake / "inference" / "sub").mkdir(parents=True)
    sources = {
        "from .. import data": "lightning_moe.data",
        "from ..methods.base import X": "lightning_moe.methods.base",
        "import lightning_moe.metrics.answers": "lightning_moe.metrics.answers",
        "from lightning_moe import methods": "lightning_moe.methods",
        "import lightning.pytorch as pl": "lightning.pytorch",
        "def f():\n    import importlib\n    importlib.import_module('lightning_moe.data')": "lightning_moe.data",
    }
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    for i, (source, expected) in enumerate(sources.items()):
        file = fake / "inference" / f"m{i}.py"
        file.write_text(source + "\n")
        assert expected in [name for _, name in imported_modules(file)], source
    nested = fake / "inference" / "sub" / "x.py"
    nested.write_text("from ...data import y\n")
    assert "lightning_moe.data" in [name for _, name in imported_modules(nested)]


# --------------------------------------------------------------------------- fresh interpreters
IMPORT_CHILD = """
import json, sys
import torch  # the baseline: what torch itself loads is not the package's doing
before = set(sys.modules)
import {module}
print(json.dumps(sorted(set(sys.modules) - before)))
"""


@pytest.fixture(scope="module")
def loaded_by(tmp_path_factory) -> dict[str, list[str]]:
    """Modules each package adds to a fresh interpreter after torch (the two run at once; once per session even
    when xdist hands this module's tests to two workers)."""
    def imports(directory: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
        parts = ["layers", "inference"]
        children = {part: subprocess.Popen([sys.executable, "-c", IMPORT_CHILD.format(module=_pkg(part))],
                                           cwd=PACKAGE.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           text=True)
                    for part in parts}
        out = {}
        for part, child in children.items():
            stdout, stderr = child.communicate(timeout=300)
            assert child.returncode == 0, stderr[-2000:]
            out[part] = json.loads(stdout.strip().splitlines()[-1])
        (directory / "loaded.json").write_text(json.dumps(out))

    return json.loads((built_once(tmp_path_factory, "layering_imports", imports) / "loaded.json").read_text())


def test_importing_layers_loads_only_torch_and_the_standard_library(loaded_by):
    loaded = loaded_by["layers"]
    assert "lightning_moe.layers" in loaded  # the import did run
    ours = [m for m in loaded if m == "lightning_moe" or m.startswith("lightning_moe.")]
    assert [m for m in ours if not _within(m, ("lightning_moe.layers",)) and m != "lightning_moe"] == []
    others = {m.split(".")[0] for m in loaded if m not in ours}
    assert sorted(others - STDLIB - {"torch"}) == []


def test_importing_inference_loads_no_lightning_data_metrics_or_methods(loaded_by):
    loaded = loaded_by["inference"]
    assert "lightning_moe.inference.offload" in loaded  # the import did run
    assert [m for m in loaded if _within(m, FORBIDDEN["inference"])] == []
