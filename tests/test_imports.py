"""Imports point one way, and no modules import each other in a circle.

Every module under ``src/lipsim`` is parsed (``ast``; imports inside functions count too, they
run sooner or later) and mapped to a level:

    0 foundation  spec, layers and the torch-free leaves they stand on (errors, fileio, images, ...)
    1 engines     archs, the fast path, the NumPy engine, the model and its files
    2 certify     certificate maths and Lipschitz verification; the ``lipsim`` facade
    3 uses        data, teachers, train, evaluate, retrieval, the torchmetrics wrapper
    4 cli         the command line

(the direction of issue 13: layers -> engine and model -> certify -> data, train, evaluate,
retrieval -> cli). A module may import its own level or a lower one. Edges of the code that break
the rule are listed in ALLOWED_UPWARD and ALLOWED_CYCLES with the reason; each entry must still
exist (a fixed violation fails the test until its entry is removed), so the lists only shrink.
"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "lipsim"

#: module (or package prefix) -> level; the longest matching prefix wins
LEVELS = {
    "lipsim.errors": 0,
    "lipsim.spec": 0,
    "lipsim.layers": 0,
    "lipsim.pooling": 0,
    "lipsim.fileio": 0,
    "lipsim.devices": 0,
    "lipsim.quiet": 0,
    "lipsim.images": 0,
    "lipsim.batching": 0,
    "lipsim.hub": 0,
    "lipsim.modelfiles": 0,
    "lipsim.precision": 0,
    "lipsim.embedding": 0,
    "lipsim.archs": 1,
    "lipsim.fast": 1,
    "lipsim.engine": 1,
    "lipsim.triton_kernels": 1,
    "lipsim.numpy_engine": 1,
    "lipsim.model": 1,
    "lipsim.checkpoints": 1,
    "lipsim.certify": 2,
    "lipsim.verify": 2,
    "lipsim": 2,  # the package facade (lazy re-exports of load, create_model, ...)
    "lipsim.data": 3,
    "lipsim.teachers": 3,
    "lipsim.train": 3,
    "lipsim.evaluate": 3,
    "lipsim.retrieval": 3,
    "lipsim.metrics": 3,
    "lipsim.cli": 4,
    "lipsim.__main__": 4,
}
LEVEL_NAMES = ("foundation", "engines", "certify", "uses", "cli")

#: (importer, imported) edges that go up a level in today's code, each with its reason
ALLOWED_UPWARD = {
    # certify.py is pure maths without lipsim imports; the engines' certify_* methods call it.
    # The issue puts certify above the engines: these go once those methods live in certify
    # (or certify is placed with the foundation).
    ("lipsim.model", "lipsim.certify"),
    ("lipsim.numpy_engine", "lipsim.certify"),
}
#: strongly connected groups of modules that exist today, each with its reason
ALLOWED_CYCLES: set[frozenset[str]] = set()


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(src: Path = SRC) -> dict[str, Path]:
    return {_module_name(p, src): p for p in sorted(src.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module an import refers to: ``name`` itself or the closest enclosing module."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """lipsim modules imported anywhere in the file (top level, functions, classes)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            # "from pkg import x": x is a submodule when one exists, else a name of pkg
            targets = [f"{base_name}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target == "lipsim" or target.startswith("lipsim."):
                resolved = _resolve(target, modules)
                if resolved is not None and resolved != name:
                    found.add(resolved)
    return found


def _level(name: str) -> int:
    probe = name
    while probe:
        if probe in LEVELS:
            return LEVELS[probe]
        probe = probe.rpartition(".")[0]
    raise KeyError(name)


def _graph(src: Path = SRC) -> dict[str, set[str]]:
    modules = _modules(src)
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.add(member)
                    if member == node:
                        break
                if len(group) > 1:
                    out.append(frozenset(group))
    return out


def test_every_module_has_a_level():
    missing = [name for name in _modules() if _probe_missing(name)]
    assert not missing, f"give these modules a level in LEVELS: {missing}"


def _probe_missing(name: str) -> bool:
    try:
        _level(name)
    except KeyError:
        return True
    return False


def test_imports_point_down():
    graph = _graph()
    upward = {(a, b) for a, targets in graph.items() for b in targets if _level(b) > _level(a)}
    new = sorted(upward - ALLOWED_UPWARD)
    described = [f"{a} ({LEVEL_NAMES[_level(a)]}) imports {b} ({LEVEL_NAMES[_level(b)]})" for a, b in new]
    assert not new, "upward imports:\n" + "\n".join(described)
    fixed = sorted(ALLOWED_UPWARD - upward)
    assert not fixed, f"no longer imported upward, remove from ALLOWED_UPWARD: {fixed}"


def test_no_import_cycles():
    cycles = set(_cycles(_graph()))
    new = [sorted(c) for c in cycles - ALLOWED_CYCLES]
    assert not new, f"import cycles: {new}"
    fixed = [sorted(c) for c in ALLOWED_CYCLES - cycles]
    assert not fixed, f"cycles that no longer exist, remove from ALLOWED_CYCLES: {fixed}"


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The parser finds a relative import hidden in a function, and the level rule flags it."""
    pkg = tmp_path / "lipsim"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "layers.py").write_text("def f():\n    from .cli import main\n    return main\n")
    (pkg / "cli.py").write_text("from . import layers\n")
    (pkg / "sub" / "__init__.py").write_text("from ..cli import x\nimport lipsim.layers as L\n")
    graph = _graph(pkg)
    assert graph["lipsim.layers"] == {"lipsim.cli"}
    assert graph["lipsim.sub"] == {"lipsim.cli", "lipsim.layers"}
    assert _level("lipsim.layers") < _level("lipsim.cli")
    assert _cycles(graph) == [frozenset({"lipsim.layers", "lipsim.cli"})]
