"""docs/ARCHITECTURE.md's layers, enforced: data flows down, imports point down. Every module of each
layer of python/fusedgpt (and triton_kernels/) is parsed, and no import in it, at the top or inside a
function, names a module of a layer above it or of a sibling layer."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "python" / "fusedgpt"

# layer -> (its files, the fusedgpt modules it must not import). Top to bottom: cli; generation;
# models and patching (siblings: neither imports the other); nn; ops; triton_kernels.
ABOVE_OPS = ("fusedgpt.nn", "fusedgpt.models", "fusedgpt.patching", "fusedgpt.generation", "fusedgpt.cli")
LAYERS = {
    "generation": ([PACKAGE / "generation.py"], ("fusedgpt.cli", "fusedgpt.patching")),
    "models": (sorted((PACKAGE / "models").glob("*.py")), ("fusedgpt.generation", "fusedgpt.cli", "fusedgpt.patching")),
    "patching": (sorted((PACKAGE / "patching").glob("*.py")), ("fusedgpt.generation", "fusedgpt.cli", "fusedgpt.models")),
    "nn": (sorted((PACKAGE / "nn").glob("*.py")), ABOVE_OPS[1:]),
    "ops": (sorted((PACKAGE / "ops").glob("*.py")), ABOVE_OPS),
    "triton_kernels": (sorted((ROOT / "triton_kernels").glob("*.py")), ABOVE_OPS + ("fusedgpt.ops",)),
}


def imported_names(path: pathlib.Path, package: list[str]) -> list[tuple[int, str]]:
    """(line, dotted name) of everything `path` imports: modules and `from m import x` as m.x."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) + 1 - node.level] if node.level else []  # relative: from here
            module = ".".join(base + ([node.module] if node.module else []))
            names += [(node.lineno, module)] + [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
    return names


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_imports_point_down(layer):
    files, forbidden = LAYERS[layer]
    assert files, f"no files found for layer {layer}"
    found = []
    for path in files:
        package = ["fusedgpt"] + list(path.relative_to(PACKAGE).parent.parts) if PACKAGE in path.parents else \
            ["fusedgpt", "triton_kernels"]
        found += [(path.name, line, name) for line, name in imported_names(path, package)
                  if any(name == module or name.startswith(module + ".") for module in forbidden)]
    assert not found, f"fusedgpt's {layer} layer imports from above it: {found}"


def _module_name(path: pathlib.Path) -> str:
    if PACKAGE in path.parents or path.parent == PACKAGE:
        parts = ["fusedgpt"] + list(path.relative_to(PACKAGE).with_suffix("").parts)
    else:
        parts = ["fusedgpt", "triton_kernels", path.stem]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycles():
    """The graph of module-level imports between fusedgpt's modules (`from m import x`: an edge to m.x
    when x is a submodule, else to m) has no cycle; a package's __init__ running before its submodules
    is Python's own order, not an edge."""
    files = sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "triton_kernels").glob("*.py"))
    modules = {_module_name(path): path for path in files}
    graph = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        edges = set()
        for node in ast.parse(path.read_text(), filename=str(path)).body:  # module level only
            if isinstance(node, ast.ImportFrom):
                base = package[:len(package) + 1 - node.level] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:  # a submodule x of m needs m.x (m itself only as its parent)
                    submodule = f"{module}.{alias.name}"
                    edges.add(submodule if submodule in modules else module)
            elif isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
        graph[name] = sorted(edge for edge in edges if edge in modules and edge != name)
    state, cycles = {}, []

    def visit(node, trail):
        state[node] = "open"
        for edge in graph[node]:
            if state.get(edge) == "open":
                cycles.append(trail[trail.index(edge):] + [edge])
            elif edge not in state:
                visit(edge, trail + [edge])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert len(graph) > 30 and not cycles, f"import cycles: {cycles}"
