"""The package's layers: every module imports, imports point down, no cycles.

``LAYERS`` is the declared order, lowest first (docs/architecture.md draws
it). A module may import from its own layer or any layer below; an import of
a higher layer, or any cycle between modules (lazy and TYPE_CHECKING imports
included: they are dependencies too), fails with the offending path.
"""
import ast
import importlib
import pathlib
import pkgutil
from typing import Dict, List, Set

import rasa_persistent_tracker

PACKAGE = "rasa_persistent_tracker"
ROOT = pathlib.Path(rasa_persistent_tracker.__file__).parent

# Lowest first. A name is a top-level module or a sub-package (all its modules).
LAYERS: List[List[str]] = [
    ["errors"],
    ["config"],
    ["files", "values", "logids", "metrics", "redis_client", "connect", "inflight"],
    ["security"],  # serde, crypto, codec, rekey
    ["hot"],  # protocol, entry header, Redis backend and its Lua, embedded SQLite
    ["log"],  # tables, migrations, bulk, event log, outbox entries and delivery
    ["record"],  # Rasa events, window, replay, memory, turns, trackers
    ["recovery"],  # history, merging, restoring
    ["startup"],
    ["backends"],
    ["store"],
    ["admin"],  # inspection, quarantine, rotation, import
    ["cli"],
    ["__init__"],  # the public facade
]


def all_modules() -> List[str]:
    names = [PACKAGE]
    names += [m.name for m in pkgutil.walk_packages([str(ROOT)], f"{PACKAGE}.")]
    return sorted(names)


def layer_of(module: str) -> int:
    if module == PACKAGE:
        part = "__init__"
    else:
        part = module.split(".")[1]
    for index, names in enumerate(LAYERS):
        if part in names:
            return index
    raise AssertionError(f"{module} is in no declared layer (tests/test_layers.py LAYERS)")


def source_of(module: str) -> pathlib.Path:
    path = ROOT.joinpath(*module.split(".")[1:])
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imports_of(module: str, known: Set[str]) -> Set[str]:
    """Modules of this package that ``module`` imports, anywhere in its source."""
    found: Set[str] = set()
    tree = ast.parse(source_of(module).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # "from pkg import name": name is a module, or a name pkg defines
            modules = [f"{node.module}.{a.name}" for a in node.names]
            targets = [m for m in modules if m in known]
            if len(targets) < len(modules):
                targets.append(node.module)
        else:
            continue
        found.update(t for t in targets if t in known and t != module)
    return found


def graph() -> Dict[str, Set[str]]:
    known = set(all_modules())
    return {module: imports_of(module, known) for module in known}


def test_every_module_imports():
    for module in all_modules():
        importlib.import_module(module)


def test_every_module_is_in_a_layer():
    for module in all_modules():
        layer_of(module)


def test_imports_point_down():
    upward = [f"{module} (layer {layer_of(module)}) imports {target} (layer "
              f"{layer_of(target)})"
              for module, targets in graph().items() for target in sorted(targets)
              if layer_of(target) > layer_of(module)]
    assert not upward, "\n".join(upward)


def find_cycle(edges: Dict[str, Set[str]]) -> List[str]:
    """One import cycle as a path (first == last), or [] if there is none."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert not cycle, " -> ".join(cycle)


def test_the_checks_can_fail():
    """Control: a cycle and an upward import are found when there is one."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []
    assert layer_of(f"{PACKAGE}.errors") < layer_of(f"{PACKAGE}.store")
