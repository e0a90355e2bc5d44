"""Every rule of the layers in docs/architecture.md ("Layers"), checked two ways, and no import cycle anywhere.

- `layers/` imports only torch (and the standard library);
- `models/` never imports Lightning, `methods/` or `formats/`;
- `formats/` (model formats on disk, above the model) imports of the package only `models/`, `modalities/`,
  `layers/`, `tokens`, `paths` and `safe_load`, and never Lightning;
- `data/` never imports `models/`, `formats/` or `methods/`;
- `inference/` never imports Lightning, `data/`, `metrics/` or `methods/`;
- `modalities/` (the modality registry, below both `data/` and `models/`) imports neither, nor `tokens` or Lightning;
- `metrics/` never imports `models/`, `formats/`, `data/` or `methods/`;
and, from the same diagram, none of these (nor `tokens.py`, which data/ and models/ share, nor `methods/`) imports
the command layers above them (`cli`, `edge`, `export`, `callbacks`, `experiments`).

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

No import cycle: the import graph of every module of the package, from the AST (module-level,
function-local and `TYPE_CHECKING` imports alike: a cycle hidden in a function is still one), has no
strongly connected component of more than one module. Its edges (`import_graph`):
- `import a.b.c`, and `from a.b import c` where `a.b.c` is a module, are an edge to that module;
  `from a.b import name` of anything else is an edge to `a.b` (a package: its `__init__`).
- Importing a module first runs the `__init__` of every package above it: an edge to each of those
  too, except the packages that hold the importer, which are running already when it runs. So a
  package `__init__` that imports its own submodules is no cycle with them; a submodule that takes a
  name from its own package's `__init__` (`from . import name`, `from lightning_moe.models import X`
  inside models/) is an edge to that `__init__`, and a cycle when the `__init__` imports it.
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
    "models": (*LIGHTNING, _pkg("methods"), _pkg("formats"), *COMMANDS),
    "formats": LIGHTNING,  # and of the package only OWN_ALLOWED["formats"]
    "data": (_pkg("models"), _pkg("formats"), _pkg("methods"), *COMMANDS),
    "inference": (*LIGHTNING, _pkg("data"), _pkg("metrics"), _pkg("methods"), *COMMANDS),
    "tokens": (*LIGHTNING, _pkg("data"), _pkg("models"), _pkg("formats"), _pkg("methods"), *COMMANDS),
    "modalities": (*LIGHTNING, _pkg("tokens"), _pkg("data"), _pkg("models"), _pkg("formats"), _pkg("methods"),
                   *COMMANDS),
    "metrics": (_pkg("models"), _pkg("formats"), _pkg("data"), _pkg("methods"), *COMMANDS),
    "methods": COMMANDS,
    # the export command works on models/ (a .ckpt through models' loader), never on a LightningModule
    "export": (*LIGHTNING, _pkg("methods"), _pkg("data"), _pkg("metrics"), _pkg("cli"), _pkg("edge"),
               _pkg("callbacks"), _pkg("experiments")),
}
# parts held to a list of the package's modules they may import (besides the package's own `__init__`)
OWN_ALLOWED = {
    "layers": (_pkg("layers"),),
    "formats": tuple(_pkg(p) for p in ("formats", "models", "modalities", "layers", "tokens", "paths", "safe_load",
                                            "gguf_files")),
}
STDLIB = set(sys.stdlib_module_names) | {"__future__"}


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _module_of(file: Path) -> str:
    parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _ours(name: str) -> bool:
    return name == "lightning_moe" or name.startswith("lightning_moe.")


def import_statements(file: Path) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module name, the names a `from` import takes from it) for every import in `file`,
    relative ones resolved (`import x` and `import_module("x")` take no names)."""
    module = _module_of(file)
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            found.append((node.lineno, base, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                name = node.args[0].value
                if name.startswith(".") and len(node.args) > 1:  # import_module(".x", package) is rare; resolve simply
                    name = package + name
                found.append((node.lineno, name, []))
    return found


def imported_modules(file: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in `file`, relative ones resolved."""
    found = []
    for line, base, names in import_statements(file):
        found.append((line, base))
        if _ours(base):
            # `from .. import data` imports the submodule lightning_moe.data (a plain name: an attribute)
            found += [(line, f"{base}.{name}") for name in names if name != "*"]
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
    if part in OWN_ALLOWED and _ours(name):
        return not (name == "lightning_moe" or _within(name, OWN_ALLOWED[part]))
    if part == "layers":
        return name.split(".")[0] not in STDLIB | {"torch"}
    return _within(name, FORBIDDEN[part])


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
            ours = _ours(name)
            target = _modules_run_by(name)[-1] if ours else name  # `from x import Name`: the module x
            if _forbidden(part, target):
                out.append(f"{chain[module]} ({file.relative_to(PACKAGE.parent)}:{line}) imports {target}")
            elif ours:  # follow it: what it imports is imported too (not past a violation, reported once)
                for reached in _modules_run_by(name):
                    if reached not in chain:
                        chain[reached] = f"{chain[module]} -> {reached}"
                        queue.append(reached)
    return sorted(set(out))


@pytest.mark.parametrize("part", ["layers", "models", "formats", "data", "inference", "tokens", "modalities", "metrics",
                                  "methods"])
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


# --------------------------------------------------------------------------- import cycles
def import_graph() -> dict[str, dict[str, str]]:
    """Every module of the package -> {module it imports: "file:line" of the first such import} (module docstring)."""
    graph: dict[str, dict[str, str]] = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        importer = _module_of(file)
        edges = graph.setdefault(importer, {})
        for line, base, names in import_statements(file):
            if not _ours(base):
                continue
            targets = {f"{base}.{name}" if name != "*" and _module_file(f"{base}.{name}") else base
                       for name in names} or {base}
            for target in targets:
                run = _modules_run_by(target)  # the packages above it, then the module itself
                for module in run:
                    # a package holding the importer is running already: importing its submodule runs nothing
                    if module != importer and (module == run[-1] or not _within(importer, (module,))):
                        edges.setdefault(module, f"{file.relative_to(PACKAGE.parent)}:{line}")
    return graph


def import_cycles(graph: dict[str, dict[str, str]]) -> list[tuple[str, ...]]:
    """The strongly connected components of `graph` of more than one module (each sorted): every module of
    one reaches every other through imports."""
    def reachable(start: str) -> set[str]:
        seen, stack = set(), [start]
        while stack:
            for module in graph.get(stack.pop(), {}):
                if module not in seen:
                    seen.add(module)
                    stack.append(module)
        return seen

    reach = {module: reachable(module) for module in graph}
    return sorted({tuple(sorted(other for other in reach[module] if module in reach.get(other, ())))
                   for module in graph if module in reach[module]})


def _describe(cycle: tuple[str, ...], graph: dict[str, dict[str, str]]) -> str:
    edges = [f"  {a} -> {b} ({where})" for a in cycle for b, where in graph[a].items() if b in cycle]
    return "cycle of " + ", ".join(cycle) + ":\n" + "\n".join(edges)


def test_no_import_cycle_anywhere_in_the_package():
    graph = import_graph()
    assert {"lightning_moe.models.multimodal", "lightning_moe.formats", "lightning_moe.cli"} <= set(graph)
    cycles = import_cycles(graph)
    assert cycles == [], "\n".join(_describe(cycle, graph) for cycle in cycles)


def test_the_cycle_check_finds_cycles_through_lazy_imports_and_package_inits(tmp_path, monkeypatch):
    """The check itself, on a fake package: a 3-cycle closed by a function-local import (through a TYPE_CHECKING
    one) is found; a package __init__ re-exporting its submodule is none; a submodule taking a name from its
    package's __init__ is one."""
    fake = tmp_path / "lightning_moe"
    files = {
        "__init__.py": "",
        "pkg/__init__.py": "from .a import f\n",  # re-exports its submodule: no cycle by itself
        "pkg/a.py": "from .b import g\n\ndef f():\n    return g()\n",
        "pkg/b.py": ("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from lightning_moe.pkg.c import C\n\n"
                     "def g():\n    return 1\n"),
        "pkg/c.py": "class C:\n    def h(self):\n        from . import a  # the submodule: an edge to pkg.a only\n",
        "other/__init__.py": "from .inner import y\nz = 1\n",
        "other/inner.py": "def y():\n    from . import z  # a name of other/__init__.py\n",
        "user.py": "import lightning_moe.pkg.a\nfrom lightning_moe.other import y\n",
    }
    for name, source in files.items():
        (fake / name).parent.mkdir(parents=True, exist_ok=True)
        (fake / name).write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    graph = import_graph()
    assert graph["lightning_moe.user"].keys() == {"lightning_moe.pkg", "lightning_moe.pkg.a", "lightning_moe.other"}
    assert import_cycles(graph) == [("lightning_moe.other", "lightning_moe.other.inner"),
                                    ("lightning_moe.pkg.a", "lightning_moe.pkg.b", "lightning_moe.pkg.c")]
    assert "pkg/c.py:3" in _describe(import_cycles(graph)[1], graph)


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
