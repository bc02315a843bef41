"""The package's layers import in one direction, modules stay short, and no
import cycle exists (docs/concepts.md, "Layers")."""

from __future__ import annotations

import ast
import pathlib

import networkx as nx

ROOT = pathlib.Path(__file__).resolve().parents[1] / "zerograph"

# each layer may import itself and the layers listed for it (transitively lower)
LAYERS = {
    "_torch_private": set(),
    "config": set(),
    "models": set(),
    "kernels": {"_torch_private"},
    "runtime": {"config", "_torch_private"},
    "graph": {"runtime"},
    "planner": {"graph"},
    "passes": {"planner", "kernels"},
    "pipeline": {"graph", "checkpoint"},
    "checkpoint": {"runtime"},
    "backend": {"passes"},
    "api": {"backend", "pipeline", "checkpoint"},
    "explain": {"api"},
    "integrations": {"api"},
    "cli": {"__init__", "models"},
    "__init__": {"explain", "integrations"},
    "__main__": {"__init__"},
}
TOP_LEVEL = {"__init__", "__main__", "api", "_torch_private", "explain"}
MAX_LINES = 520


def _allowed(layer: str) -> set[str]:
    seen, todo = {layer}, [layer]
    while todo:
        for below in LAYERS[todo.pop()]:
            if below not in seen:
                seen.add(below)
                todo.append(below)
    return seen


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 2:
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: pathlib.Path, top_only: bool):
    tree = ast.parse(path.read_text())
    body = tree.body if top_only else list(ast.walk(tree))
    for node in body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("zerograph"):
            for alias in node.names:  # "from package import submodule" imports the submodule
                sub = ROOT.parent.joinpath(*node.module.split("."), alias.name)
                yield f"{node.module}.{alias.name}" if sub.with_suffix(".py").exists() or sub.is_dir() else node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("zerograph"):
                    yield alias.name


def _files():
    return sorted(p for p in ROOT.rglob("*.py"))


def test_layers_import_downwards():
    bad = []
    for path in _files():
        mod = _module_name(path)
        layer = _layer(mod)
        assert layer in LAYERS, f"{mod}: layer {layer!r} is not in LAYERS; add it with the layers it may import"
        for target in _imports(path, top_only=False):
            target_layer = _layer(target)
            if target == "zerograph":
                target_layer = "__init__"
            if target_layer not in _allowed(layer):
                bad.append(f"{mod} imports {target} ({layer} -> {target_layer})")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = nx.DiGraph()
    for path in _files():
        mod = _module_name(path)
        graph.add_node(mod)
        for target in _imports(path, top_only=False):
            if target != "zerograph" and target != mod:
                graph.add_edge(mod, target)
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles}"


def test_modules_are_short_and_top_level_is_small():
    long = [f"{p.relative_to(ROOT.parent)}: {n}" for p in _files() if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"modules over {MAX_LINES} lines: {long}"
    top = {p.stem for p in ROOT.glob("*.py")}
    assert top <= TOP_LEVEL, f"top-level modules beyond {sorted(TOP_LEVEL)}: {sorted(top - TOP_LEVEL)}"
