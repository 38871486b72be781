"""The layering of the product code, read from its import statements.

- no import cycle between modules (imports at module level; imports inside a
  function run late and cannot deadlock module initialisation, but they still
  count for the direction rules below);
- ``ocidist`` (the OCI vocabulary) imports no other part of Meridian;
- product code never imports the load tests or the tests; the one exception
  is the ``meridian`` dispatcher, which hands ``meridian loadtest`` to its
  package inside the subcommand's function;
- the node never imports the router (they talk over HTTP only), and the
  local cluster is never imported by the node, the router or the vocabulary.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("ocidist", "node", "cluster", "proto", "localcluster")
ALL = (*PRODUCT, "loadtest")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in ALL:
        base = ROOT / pkg
        if base.is_dir():
            for path in base.rglob("*.py"):
                out[_module_name(path)] = path
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The known module an import names: ``a.b.c`` -> ``a.b.c`` or its
    longest known prefix (``from a.b import c`` may import a name of a.b)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(mod: str, path: Path, known: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(module-level imports, imports anywhere) of ``mod``, as known modules."""
    tree = ast.parse(path.read_text(), str(path))
    top: set[str] = set()
    anywhere: set[str] = set()
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]

    def targets(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        assert isinstance(node, ast.ImportFrom)
        base = node.module or ""
        if node.level:
            parts = package.split(".")
            up = parts[: len(parts) - (node.level - 1)]
            base = ".".join([*up, base] if base else up)
        return [f"{base}.{a.name}" for a in node.names] + [base]

    def visit(node: ast.AST, at_top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for name in targets(child):
                    target = _resolve(name, known)
                    if target is not None and target != mod:
                        anywhere.add(target)
                        if at_top:
                            top.add(target)
            elif isinstance(child, ast.If) and _is_type_checking(child):
                visit(child, False)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)
            else:
                visit(child, at_top)

    visit(tree, True)
    return top, anywhere


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    known = _modules()
    top: dict[str, set[str]] = {}
    anywhere: dict[str, set[str]] = {}
    for mod, path in known.items():
        top[mod], anywhere[mod] = _imports(mod, path, known)
    return top, anywhere


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def strong(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            # A package importing its own submodule (or the reverse through
            # the package's __init__) is how Python packages work, not a cycle.
            if w.startswith(v + ".") or v.startswith(w + "."):
                continue
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def _top_package(mod: str) -> str:
    return mod.split(".")[0]


def test_the_graph_is_read() -> None:
    top, anywhere = _graph()
    # Guards the reader itself: these edges exist in any working tree.
    assert "ocidist.errors" in anywhere["ocidist.digests"]
    assert any(m.startswith("node.") for m in top)
    assert any(dep.startswith("cluster.") for dep in anywhere["node.app"])


def test_no_import_cycles() -> None:
    top, _ = _graph()
    assert _cycles(top) == []


def test_vocabulary_imports_nothing_of_meridian() -> None:
    _, anywhere = _graph()
    bad = {
        (m, d)
        for m, deps in anywhere.items()
        if _top_package(m) == "ocidist"
        for d in deps
        if _top_package(d) != "ocidist"
    }
    assert bad == set()


def test_product_never_imports_load_tests_or_tests() -> None:
    _, anywhere = _graph()
    bad = {
        (m, d)
        for m, deps in anywhere.items()
        if _top_package(m) in PRODUCT
        for d in deps
        if _top_package(d) in ("loadtest", "tests")
    }
    # The dispatcher hands `meridian loadtest` to its package, lazily.
    bad.discard(("cluster.cli", "loadtest.cli"))
    assert bad == set()
    top, _ = _graph()
    assert "loadtest.cli" not in top["cluster.cli"]


def test_node_never_imports_router_nor_local_cluster() -> None:
    _, anywhere = _graph()
    bad = {
        (m, d)
        for m, deps in anywhere.items()
        if _top_package(m) in ("node", "ocidist", "proto")
        for d in deps
        if d.startswith("cluster.router") or _top_package(d) == "localcluster"
    }
    assert bad == set()


def test_the_checks_can_fail() -> None:
    """The rules above are only worth something if they see violations."""
    fake = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(fake) == [["a", "b", "c"]]
    assert _cycles({"p": {"p.x"}, "p.x": {"p"}}) == []


def test_product_never_runs_load_test_modules() -> None:
    """Nor through a child process: ``python -m loadtest.x`` from product code
    is the same dependency as an import."""
    found = []
    for mod, path in _modules().items():
        if _top_package(mod) not in PRODUCT:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if node.value.startswith(("loadtest.", "tests.")) and " " not in node.value:
                    found.append((mod, node.value))
    assert found == []
