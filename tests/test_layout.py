"""The package's shape (docs/architecture.md): imports go down the layers only, no import
circle between modules, and no module grows past 400 lines; the CLI (top-level cli/, imported as
`weavelm.cli` from a checkout as from an install) included."""
import ast
import pathlib

import weavelm
import weavelm.cli

PKG = pathlib.Path(weavelm.__file__).parent
CLI = pathlib.Path(weavelm.cli.__path__[0])
# Each layer may import itself and the layers after it in this list, never one before it.
LAYERS = ["cli", "serve", "bench", "engine", "models", "weave", "parallel", "kernels"]


def _files() -> list[tuple[pathlib.Path, tuple[str, ...]]]:
    """(path, module name parts) of every module of weavelm and its CLI."""
    out = [(p, p.relative_to(PKG.parent).with_suffix("").parts) for p in PKG.rglob("*.py")]
    out += [(p, ("weavelm", "cli") + p.relative_to(CLI).with_suffix("").parts)
            for p in CLI.rglob("*.py")]
    return out


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path, parts in _files():
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
    long = {".".join(parts): n for p, parts in _files()
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_the_cli_is_one_package():
    """`weavelm.cli` is the top-level cli/ folder, and nothing imports it as plain `cli`."""
    assert CLI.resolve() == (PKG.parent / "cli").resolve()
    plain = [str(p) for p, _ in _files()
             if any(isinstance(n, (ast.Import, ast.ImportFrom)) and any(
                 (getattr(n, "module", None) or a.name).split(".")[0] == "cli"
                 for a in n.names) and not getattr(n, "level", 0)
                 for n in ast.walk(ast.parse(p.read_text())))]
    assert not plain, plain
