"""Imports flow one way between rooms (docs/architecture.md), without cycles; only cli touches Hydra."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "difflab"
ALLOWED = {
    "diffusion": set(),
    "samplers": {"diffusion", "nets"},  # generate() prepares the net (nets.inference) and its Conditioning
    "nets": set(),
    "metrics": {"data"},  # metrics read images in data's formats: its uint8 <-> [-1, 1] formulas, once
    "data": set(),
    "lit": {"diffusion", "samplers", "nets"},
    "callbacks": {"metrics", "samplers", "data", "nets"},
    "cli": {"diffusion", "samplers", "nets", "metrics", "data", "lit", "callbacks"},
}
# the one file outside cli that builds objects from a (stored) config: checkpoints are rebuilt in lit
HYDRA_OUTSIDE_CLI = {SRC / "lit" / "from_config.py"}


def imports_of(path: Path, *, submodules: bool = False) -> set[str]:
    """Every module a file imports, at the top or inside functions (lazy imports count too); with
    submodules, `from pkg import name` also yields pkg.name (a submodule when one exists)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if submodules:
                names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_room_imports(room):
    for path in (SRC / room).rglob("*.py"):
        for name in imports_of(path):
            if name.startswith("difflab."):
                other = name.split(".")[1]
                assert other == room or other in ALLOWED[room], f"{path.name} imports {name}"
            if room != "cli" and path not in HYDRA_OUTSIDE_CLI:
                assert not name.startswith(("hydra", "omegaconf")), f"{path.name} imports {name}"


def import_graph() -> dict[str, set[str]]:
    """difflab module -> the difflab modules it imports (a package import counts as its __init__)."""
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = imports_of(path, submodules=True)
        targets = set()
        for imported in found:
            if f"{imported}." in "".join(f"{m}." for m in found if m != imported and m in modules) and imported in modules:
                continue  # `from pkg import submodule`: the submodule, not the package's __init__
            while imported and imported not in modules:  # `from difflab.x.y import name`: the module part
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    for root in sorted(graph):
        if state.get(root):
            continue
        stack, path = [(root, iter(sorted(graph[root])))], [root]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(sorted(graph.get(child, ())))))
                path.append(child)
    return None


def test_no_import_cycles_anywhere_in_src():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_nothing_imports_cli():
    for name, targets in import_graph().items():
        if not name.startswith("difflab.cli"):
            assert not [t for t in targets if t.startswith("difflab.cli")], f"{name} imports {targets}"
