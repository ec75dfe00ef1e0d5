"""The package's one dependency rule, checked from the source of every module (imports inside functions too).

    the model (stablesr_min/*.py)   imports only model modules (and the leaves: errors, devices, progress,
                                    image_io, atomic, which are model modules with no model imports)
    stablesr_min/tiny               the shipped weights and the choice of default weights: imports the model
    stablesr_min/train              imports the model
    stablesr_min/app                imports anything; only `__main__` imports it
and no import cycle anywhere.
"""

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "stablesr_min"
LEAVES = {"errors", "devices", "progress", "image_io", "atomic"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """Every stablesr_min module `name` imports, wherever in the file the import statement is."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("stablesr_min")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("stablesr_min"):
                continue
            # `from . import metrics` imports the module stablesr_min.app.metrics
            submodules = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES}
            found |= submodules or {target}
    return found - {name}


def layer(name: str) -> str:
    parts = name.split(".")
    if name == "stablesr_min.__main__":
        return "main"
    return parts[1] if len(parts) > 1 and parts[1] in ("app", "train", "tiny") else "model"


ALLOWED = {"model": {"model"}, "tiny": {"model", "tiny"}, "train": {"model", "train"},
           "app": {"model", "tiny", "train", "app"}, "main": {"app"}}


def test_every_module_imports_only_what_its_layer_may():
    wrong = [f"{name} ({layer(name)}) imports {target} ({layer(target)})"
             for name in MODULES for target in sorted(imports_of(name))
             if layer(target) not in ALLOWED[layer(name)]]
    assert wrong == []


def test_the_leaves_import_no_other_model_module_but_leaves():
    wrong = {leaf: imports_of(f"stablesr_min.{leaf}") - {f"stablesr_min.{x}" for x in LEAVES} for leaf in LEAVES}
    assert {leaf: found for leaf, found in wrong.items() if found} == {}


def test_no_import_cycle():
    graph = {name: imports_of(name) & MODULES.keys() for name in MODULES}
    cycles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_rule_sees_a_violation():
    """The checks above would fail on the old layout: a model module importing the command line."""
    assert layer("stablesr_min.pipeline") == "model" and layer("stablesr_min.app.cli") == "app"
    assert "app" not in ALLOWED["model"] and "train" not in ALLOWED["model"]
    assert "stablesr_min.train.engine" in imports_of("stablesr_min.train.sr")  # relative imports resolve
    assert "stablesr_min.app.metrics" in imports_of("stablesr_min.app.evaluate")  # `from . import metrics`


def test_importing_loads_no_module_of_a_higher_layer():
    """In one fresh interpreter, from the lowest layer up (each import adds what it needs; nothing of a layer
    above may be among it): the model, then the pipeline, then the notebooks' helper."""
    steps = [("import stablesr_min.model", ("stablesr_min.train", "stablesr_min.app", "stablesr_min.tiny")),
             ("import stablesr_min.pipeline", ("stablesr_min.train", "stablesr_min.app")),
             ("from stablesr_min.app import analysis", ("stablesr_min.app.cli",))]
    code = ["import sys, json", "seen = []"]
    for statement, _ in steps:
        code += [statement, "seen.append(sorted(m for m in sys.modules if m.startswith('stablesr_min')))"]
    code.append("print(json.dumps(seen))")
    out = subprocess.run([sys.executable, "-c", "\n".join(code)], cwd=PACKAGE.parent, capture_output=True,
                         text=True, check=True)
    for (statement, forbidden), loaded in zip(steps, json.loads(out.stdout)):
        assert [m for m in loaded if m.startswith(forbidden)] == [], statement


def test_the_public_api_names_load_from_their_modules():
    """`stablesr_min/__init__.py` lists the public names; each loads on first use from its module."""
    import stablesr_min

    for name, module in stablesr_min.API.items():
        assert getattr(stablesr_min, name) is getattr(importlib.import_module(f"stablesr_min.{module}"), name)
    with pytest.raises(AttributeError):
        stablesr_min.not_a_name
