"""The package's layers: the maths layers import torch only, and the import graph has no circle and
no import from a lower layer into a higher one."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

FORBIDDEN = ("lightning", "pytorch_lightning", "lightning_fabric", "diffusers", "transformers", "peft", "torchmetrics")

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "dgpo_lightning"
ROOT = "dgpo_lightning"

#: Rank of each top-level part of the package: a module may import its own rank or lower ranks only.
#: ``world`` sits above ``rewards``: it provides a detector to the rewards' registry and may import
#: the rewards' leaf modules, while the rewards never import the world.
LAYERS = {
    ROOT: 0,  # the package's own __init__ (version only)
    "errors": 0,  # the user-error type, standard library only
    "algo": 0,
    "sampling": 0,
    "models": 1,
    "objectives": 2,
    "rewards": 3,
    "world": 4,
    "data": 5,
    "evaluation": 6,
    "evaluate": 6,
    "benchmark": 6,
    "module": 7,
    "callbacks": 7,
    "cli": 7,
    "demo": 7,
    "__main__": 7,
}


# --------------------------------------------------------------------------- frameworks


@pytest.mark.parametrize("package", ["dgpo_lightning.algo", "dgpo_lightning.sampling", "dgpo_lightning.objectives"])
def test_pure_layers_do_not_import_frameworks(package):
    # Every submodule is imported too: a package's __init__ need not import them all (objectives).
    code = (
        f"import importlib, json, pkgutil, sys, {package} as p\n"
        "names = [m.name for m in pkgutil.walk_packages(p.__path__, p.__name__ + '.')]\n"
        "[importlib.import_module(n) for n in names]\n"
        "print(json.dumps([names, sorted(sys.modules)]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    submodules, modules = json.loads(result.stdout.strip().splitlines()[-1])
    assert package in modules and submodules  # the probe really imported the package and its modules
    leaked = sorted(m for m in modules if m.split(".")[0] in FORBIDDEN)
    assert not leaked, f"{package} pulls in {leaked[:10]}"


def test_registries_find_the_world_by_name_without_importing_it_first():
    """The backbone and detector registries name the world's entries by module string: importing
    the registries loads no world module, and looking the names up finds them."""
    code = (
        "import json, sys\n"
        "from dgpo_lightning.models.factory import available_backbones, load_backbone\n"
        "from dgpo_lightning.rewards.geneval import GenEvalReward\n"
        "before = sorted(m for m in sys.modules if m.startswith('dgpo_lightning.world'))\n"
        "detector = GenEvalReward('world').detector.__module__\n"
        "backbone = type(load_backbone('world')).__name__\n"
        "print(json.dumps([before, available_backbones(), backbone, detector]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    before, names, backbone, detector = json.loads(result.stdout.strip().splitlines()[-1])
    assert before == [] and {"world", "sd3"} <= set(names)
    assert backbone == "WorldBackbone" and detector == "dgpo_lightning.world.detector"


# --------------------------------------------------------------------------- the import graph


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py")) if "__pycache__" not in p.parts}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """``(imported package module, line)`` for every import statement of the module, at any depth
    (function-level imports included). ``from X import y`` names the submodule ``X.y`` when there is
    one, else ``X``. Imports by string (``importlib.import_module``, lazy ``__getattr__`` tables) are
    not edges: resolving a registered name at run time is how lower layers stay unaware of higher ones."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        else:
            continue
        for target in targets:
            # ``import a.b.c`` also names a.b.c's closest package module when c is an attribute.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.split(".")[0] == ROOT and (target, node.lineno) not in found:
                found.append((target, node.lineno))
    return found


def _graph() -> tuple[dict[str, Path], dict[str, list[tuple[str, int]]]]:
    modules = _modules()
    return modules, {name: _imports(name, path, modules) for name, path in modules.items()}


def _part(module: str) -> str:
    """The top-level part of the package a module belongs to (``ROOT`` for the package's __init__)."""
    return module.split(".")[1] if "." in module else ROOT


#: Modules ranked apart from their part: command-line entry points sit with the application layer.
ENTRY_POINTS = {  # command-line entry points that evaluate as they train
    "dgpo_lightning.world.pretrain": 7,  # python -m dgpo_lightning.world.pretrain
    "dgpo_lightning.world.distill": 7,  # python -m dgpo_lightning.world.distill
}


def _layer(module: str) -> int:
    if module in ENTRY_POINTS:
        return ENTRY_POINTS[module]
    part = _part(module)
    assert part in LAYERS, f"{module}: add {part!r} to the layer table of tests/test_layering.py"
    return LAYERS[part]


def _where(modules: dict[str, Path], module: str, line: int) -> str:
    return f"{modules[module].relative_to(PACKAGE_DIR.parent)}:{line}"


def test_the_graph_sees_top_level_and_function_level_imports():
    modules, graph = _graph()
    edges = {name: {target for target, _ in imports} for name, imports in graph.items()}
    assert "dgpo_lightning.rewards.geneval_rules" in edges["dgpo_lightning.world.detector"]  # module level
    assert "dgpo_lightning.data.prompts" in edges["dgpo_lightning.benchmark"]  # inside a function
    assert "dgpo_lightning.rewards.base" in edges["dgpo_lightning.rewards"]  # a package's __init__
    assert all(_layer(name) >= 0 for name in modules)  # every part of the package has a layer


def test_no_module_imports_a_higher_layer():
    modules, graph = _graph()
    violations = [
        f"{_where(modules, name, line)}: {name} (layer {_layer(name)}) imports {target} (layer {_layer(target)})"
        for name, imports in graph.items()
        for target, line in imports
        if _layer(target) > _layer(name)
    ]
    assert not violations, "upward imports:\n" + "\n".join(violations)


def test_objectives_take_only_the_backbone_protocol_from_models():
    modules, graph = _graph()
    allowed = {"errors", "algo", "sampling", "objectives"}  # errors: the standard-library error type
    outside = [
        f"{_where(modules, name, line)}: {name} imports {target}"
        for name, imports in graph.items()
        if name.startswith(f"{ROOT}.objectives")
        for target, line in imports
        if target != f"{ROOT}.models.backbone" and _part(target) not in allowed
    ]
    assert not outside, "objectives may import torch, algo, sampling and models.backbone only:\n" + "\n".join(outside)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(edges.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return components


def test_cycle_finder_on_a_known_graph():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e2"}, "e2": set()}
    assert _cycles(edges) == [["a", "b", "c"]]


def test_no_import_cycle():
    modules, graph = _graph()
    # A module importing its own ancestor package is not a circle: Python has initialised the
    # package before the module runs (e.g. rewards.base listing the modules of dgpo_lightning.rewards).
    edges = {
        name: {target for target, _ in imports if not name.startswith(target + ".")} for name, imports in graph.items()
    }
    cycles = _cycles(edges)
    report = []
    for component in cycles:
        members = set(component)
        report.append(" <-> ".join(component))
        report += [
            f"    {_where(modules, name, line)}: {name} imports {target}"
            for name in component
            for target, line in graph[name]
            if target in members and target != name and not name.startswith(target + ".")
        ]
    assert not cycles, "import cycles:\n" + "\n".join(report)
