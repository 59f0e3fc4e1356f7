"""The package's shape (issue 20): folders import only the folders below them, and no modules import each other
in a cycle (counting imports made inside functions too)."""

import ast
from pathlib import Path

import kvchat

ROOT = Path(kvchat.__file__).parent
# Lowest first: a module may import its own folder's modules and those of the folders before its own.
LAYERS = [("errors", "config", "bootstrap", "__init__"), ("weights",), ("cache",), ("store",), ("chat",), ("bench",),
          ("ui",), ("__main__",)]
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}
# Known and owed upward imports, each to be removed (the test fails once one is gone and still listed).
OWED: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every kvchat module, and the kvchat modules it imports (anywhere in it)."""
    modules = {module_name(path): path for path in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kvchat":
                targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            found |= {target for target in targets if target in modules and target != name}
        graph[name] = found - {"kvchat"}
    return graph


def folder(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def test_the_folders_import_one_way_down():
    graph = imports()
    assert {"kvchat.cache.layers", "kvchat.chat.engine", "kvchat.store.sessions", "kvchat.ui.cli"} <= set(graph)
    upward = sorted((a, b) for a, targets in graph.items() for b in targets
                    if RANK[folder(b)] > RANK[folder(a)] and (a, b) not in OWED)
    assert upward == [], f"imports that point up: {upward}"
    assert all(b in graph[a] for a, b in OWED), "an owed upward import is gone: take it off the list"


def test_no_modules_import_each_other_in_a_cycle():
    graph = imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target] if target in path else [module, target]
            if target not in state:
                cycle = visit(target, path + [target])
                if cycle:
                    return cycle
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [module])
            assert cycle is None, f"an import cycle: {' -> '.join(cycle)}"


def test_the_store_catalog_stands_apart_from_the_kv_it_lists():
    """Issue 20: the catalog (names, manifests, locks, list, remove, prune, cap) imports neither the blob layer nor
    anything that reaches the cache or the model, and nothing in the store reads an engine."""
    graph = imports()
    reached, todo = set(), ["kvchat.store.catalog"]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(graph[module])
    assert reached == {"kvchat.store", "kvchat.store.catalog", "kvchat.store.manifests", "kvchat.store.kvfile",
                       "kvchat.config", "kvchat.errors"}
    for path in (ROOT / "store").glob("*.py"):
        assert "engine." not in path.read_text(), f"{path.name} reads an engine"
