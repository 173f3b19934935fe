"""Imports flow one way between rooms (ARCHITECTURE.md); only cli touches Hydra."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "difflab"
ALLOWED = {
    "diffusion": set(),
    "samplers": {"diffusion", "nets"},  # generate() prepares the net (nets.inference)
    "nets": set(),
    "metrics": set(),
    "data": set(),
    "lit": {"diffusion", "samplers", "nets"},
    "callbacks": {"metrics", "samplers", "data", "nets"},
    "cli": {"diffusion", "samplers", "nets", "metrics", "data", "lit", "callbacks"},
}


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_room_imports(room):
    for path in (SRC / room).rglob("*.py"):
        for name in imports_of(path):
            if name.startswith("difflab."):
                other = name.split(".")[1]
                assert other == room or other in ALLOWED[room], f"{path.name} imports {name}"
            if room != "cli":
                assert not name.startswith(("hydra", "omegaconf")), f"{path.name} imports {name}"
