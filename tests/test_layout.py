"""The tree's dependency rules, read from the code's own imports (ast, nothing imported):
the library packages (megatron_qae, rollout_sglang) import nothing from tools/, tests/,
benchmarks/, examples/ or testsupport/; rollout_sglang never imports megatron_qae; the tests
and the benchmarks do not import each other (both import testsupport/); no import cycle
among the project's modules; no package folder holds more than 16 modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP = ("megatron_qae", "rollout_sglang", "tools", "tests", "benchmarks", "examples", "testsupport")
LIBRARY = ("megatron_qae", "rollout_sglang")


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    return {_module(p): p for top in TOP for p in (ROOT / top).rglob("*.py")
            if "sglang_cpu" not in p.parts and "__pycache__" not in p.parts}


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in it (module level or inside functions)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out - {module}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    sources = _sources()
    known = set(sources)
    return {m: _imports(p, m, known) for m, p in sources.items()}


def _top(module: str) -> str:
    return module.split(".")[0]


def test_library_packages_import_no_tools_tests_benchmarks_examples_or_testsupport(graph):
    bad = sorted((m, d) for m, deps in graph.items() if _top(m) in LIBRARY
                 for d in deps if _top(d) not in LIBRARY)
    assert not bad, bad


def test_rollout_sglang_does_not_import_megatron_qae(graph):
    bad = sorted((m, d) for m, deps in graph.items() if _top(m) == "rollout_sglang"
                 for d in deps if _top(d) == "megatron_qae")
    assert not bad, bad


def test_tests_and_benchmarks_do_not_import_each_other(graph):
    pairs = {("tests", "benchmarks"), ("benchmarks", "tests"), ("testsupport", "tests"),
             ("testsupport", "benchmarks")}
    bad = sorted((m, d) for m, deps in graph.items() for d in deps if (_top(m), _top(d)) in pairs)
    assert not bad, bad


def test_no_import_cycle(graph):
    """Tarjan's strongly connected components over the import graph: every one is a single
    module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    # A package's __init__ re-exporting its own modules is not a cycle between concepts.
    cycles = [c for c in cycles if not all(m.startswith(min(c, key=len) + ".") or m == min(c, key=len)
                                           for m in c)]
    assert not cycles, cycles


def test_no_package_folder_holds_more_than_16_modules():
    crowded = {}
    for top in LIBRARY + ("tools", "testsupport"):
        for folder in [ROOT / top, *(p for p in (ROOT / top).rglob("*") if p.is_dir())]:
            modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
            if len(modules) > 16:
                crowded[str(folder.relative_to(ROOT))] = len(modules)
    assert not crowded, crowded


def test_the_check_sees_a_cycle_and_a_forbidden_import(tmp_path):
    """The rules can fail: a made-up pair of modules importing each other is one cycle, and an
    import of tests from the library is seen."""
    pkg = tmp_path / "megatron_qae"
    pkg.mkdir()
    (pkg / "a.py").write_text("from megatron_qae import b\nimport tests.helper\n")
    (pkg / "b.py").write_text("def f():\n    from megatron_qae.a import x\n")
    known = {"megatron_qae", "megatron_qae.a", "megatron_qae.b", "tests", "tests.helper"}
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        a = _imports(pkg / "a.py", "megatron_qae.a", known)
        b = _imports(pkg / "b.py", "megatron_qae.b", known)
    finally:
        ROOT = saved
    assert {"megatron_qae.b", "tests.helper"} <= a
    assert "megatron_qae.a" in b
