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
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "stablesr_min"
LEAVES = {"errors", "devices", "progress", "image_io", "atomic"}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules_of(package: Path) -> dict[str, Path]:
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))}


MODULES = modules_of(PACKAGE)


def imports_of(name: str, modules: dict[str, Path] = MODULES) -> set[str]:
    """Every stablesr_min module `name` imports, wherever in the file the import statement is."""
    path = modules[name]
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
            submodules = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules}
            found |= submodules or {target}
    return found - {name}


def layer(name: str) -> str:
    parts = name.split(".")
    if name == "stablesr_min.__main__":
        return "main"
    return parts[1] if len(parts) > 1 and parts[1] in ("app", "train", "tiny") else "model"


ALLOWED = {"model": {"model"}, "tiny": {"model", "tiny"}, "train": {"model", "train"},
           "app": {"model", "tiny", "train", "app"}, "main": {"app"}}


def wrong_imports(modules: dict[str, Path]) -> list[str]:
    """Each import that the rule forbids, in words."""
    return [f"{name} ({layer(name)}) imports {target} ({layer(target)})"
            for name in modules for target in sorted(imports_of(name, modules))
            if layer(target) not in ALLOWED[layer(name)]]


def test_every_module_imports_only_what_its_layer_may():
    assert wrong_imports(MODULES) == []


def test_the_leaves_import_no_other_model_module_but_leaves():
    wrong = {leaf: imports_of(f"stablesr_min.{leaf}") - {f"stablesr_min.{x}" for x in LEAVES} for leaf in LEAVES}
    assert {leaf: found for leaf, found in wrong.items() if found} == {}


def import_cycles(modules: dict[str, Path]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    graph = {name: imports_of(name, modules) & modules.keys() for name in modules}
    cycles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(v):
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
    return cycles


def test_no_import_cycle():
    assert import_cycles(MODULES) == []


def test_the_rule_sees_a_violation(tmp_path):
    """The checks above, given a package that breaks the rule, say where: a model module importing the
    command line (relatively, inside a function), training importing the application, and so a cycle."""
    package = tmp_path / "stablesr_min"
    files = {"__init__.py": "", "pipeline.py": "def f():\n    from .app import cli\n",
             "app/__init__.py": "", "app/cli.py": "from .. import pipeline\n",
             "train/__init__.py": "", "train/sr.py": "import stablesr_min.app.cli\n"}
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    modules = modules_of(package)
    assert wrong_imports(modules) == ["stablesr_min.pipeline (model) imports stablesr_min.app.cli (app)",
                                      "stablesr_min.train.sr (train) imports stablesr_min.app.cli (app)"]
    assert import_cycles(modules) == [["stablesr_min.app.cli", "stablesr_min.pipeline"]]


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


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def flag_literals(path: Path) -> list[str]:
    """The string literals of a file, docstrings aside, that name a command-line flag (`--dec-w`)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [f"{path.name}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
            and FLAG.search(node.value)]


def test_the_model_names_no_flag(tmp_path):
    """Flags are the application's words: the model's errors name their fields (`dec_w`), and the command line
    says the flag. A docstring may cite a command."""
    example = tmp_path / "example.py"
    example.write_text('"""`upscale --dec-w 1`: a docstring"""\n\nMESSAGE = "the CFW weight w (--dec-w)"\n')
    assert flag_literals(example) == ["example.py:3: 'the CFW weight w (--dec-w)'"]
    assert [hit for path in sorted(PACKAGE.glob("*.py")) for hit in flag_literals(path)] == []


def test_importing_the_package_changes_no_environment_variable():
    code = ("import os, json; before = dict(os.environ); import stablesr_min, stablesr_min.model, stablesr_min.pipeline; "
            "print(json.dumps(sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))))")
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    out = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True, check=True,
                         env=env)
    assert json.loads(out.stdout) == []
