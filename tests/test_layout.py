"""The package's shape (docs/architecture.md): imports go down the layers only, no import
circle between modules, and no module grows past 400 lines."""
import ast
import pathlib

import weavelm

PKG = pathlib.Path(weavelm.__file__).parent
# Each layer may import itself and the layers after it in this list, never one before it.
LAYERS = ["serve", "bench", "engine", "models", "parallel", "kernels"]


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: pathlib.Path, name: str) -> set[str]:
    """weavelm modules `path` imports, at module level or inside functions."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m.startswith("weavelm")}


def _graph():
    modules = _modules()
    return {name: {m for m in _imports(path, name) if m in modules and m != name}
            for name, path in modules.items()}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_imports_only_go_down_the_layers():
    bad = []
    for module, deps in _graph().items():
        src = _layer(module)
        if src is None:
            continue
        for dep in deps:
            dst = _layer(dep)
            if dst is not None and LAYERS.index(dst) < LAYERS.index(src):
                bad.append(f"{module} -> {dep}")
    assert not bad, bad


def test_no_import_circle():
    graph = _graph()
    # Package __init__ files re-export their modules; a module importing its own package's
    # names is not a circle of concepts, so they are left out.
    graph = {m: {d for d in deps if not _modules()[d].name == "__init__.py"}
             for m, deps in graph.items() if _modules()[m].name != "__init__.py"}
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, cycles


def test_no_module_over_400_lines():
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
