"""The layout's rules, checked on the source: no import cycles inside ``pipeline``; Ray only
in the modules that wire it (``*.flow``, ``pipeline.cluster``); no torch (or Ray) behind
``pipeline.config``, ``pipeline.schema`` and ``pipeline.storage``, so parsing a flag or
reading a Parquet file never loads CUDA libraries."""

from __future__ import annotations

import ast
import functools
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Modules allowed to import Ray: the flows, the actors they place, the cluster connection.
RAY_MODULES = {"pipeline.cluster"}
LIGHT_MODULES = ("pipeline.config", "pipeline.schema", "pipeline.storage")


def _modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "pipeline")):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(folder, f)
    return out


def _imports(path: str, modules: dict[str, str]) -> set[str]:
    """Every module named by an import anywhere in the file (function-level ones too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules)
    return names


def _graph_here() -> dict[str, list[str]]:
    modules = _modules()
    return {m: sorted(_imports(p, modules)) for m, p in modules.items()}


@functools.cache
def _graph_json() -> str:
    # Parsed in a fresh interpreter: CPython 3.11's AST conversion keeps its recursion depth in
    # shared state, and a thread left over from an earlier test (Ray, Triton, Inductor) that
    # parses at the same moment makes ``ast.parse`` here raise "AST constructor recursion
    # depth mismatch" (CI, 2026-12-03; fixed upstream in 3.12).
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _graph():
    graph = json.loads(_graph_json())
    return _modules(), {m: set(names) for m, names in graph.items() if m != "__jobs__"}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
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
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    modules, imports = _graph()
    edges = {m: {n for n in names if n in modules and n != m and not m.startswith(n + ".")} for m, names in imports.items()}
    assert _cycles(edges) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_ray_only_where_it_is_wired():
    _, imports = _graph()
    offenders = sorted(m for m, names in imports.items()
                       if any(n == "ray" or n.startswith("ray.") for n in names)
                       and not (m.endswith(".flow") or m in RAY_MODULES))
    assert offenders == [], f"Ray imported outside a flow module or {sorted(RAY_MODULES)}: {offenders}"


def test_light_modules_import_no_torch_or_ray():
    _, imports = _graph()
    for m in LIGHT_MODULES:
        heavy = sorted(n for n in imports[m] if n.split(".")[0] in ("torch", "ray", "transformers"))
        assert heavy == [], f"{m} imports {heavy}"
    # And nothing they import pulls them in either.
    code = ("import sys\nimport " + ", ".join(LIGHT_MODULES) + "\n"
            "print(sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


JOBS = ["embed_corpus", "score_queries", "evaluate", "offline_eval", "schedule_eval"]


def _job_shapes() -> dict[str, dict[str, list[str]]]:
    out = {}
    for job in JOBS:
        tree = ast.parse(open(os.path.join(ROOT, "jobs", f"{job}.py"), encoding="utf-8").read())
        out[job] = {"functions": [n.name for n in tree.body if isinstance(n, ast.FunctionDef)],
                    "classes": [n.name for n in tree.body if isinstance(n, ast.ClassDef)]}
    return out


@pytest.mark.parametrize("job", JOBS)
def test_jobs_are_thin(job):
    """A job parses flags, builds a config, calls its flow and prints the summary."""
    path = os.path.join(ROOT, "jobs", f"{job}.py")
    shape = json.loads(_graph_json())["__jobs__"][job]
    assert set(shape["functions"]) <= {"build_parser", "main", "format_metrics", "_shard_size"}, shape
    assert shape["classes"] == []
    assert sum(1 for _ in open(path, encoding="utf-8")) <= 140


if __name__ == "__main__":  # run by _graph_json in a fresh interpreter
    print(json.dumps({**_graph_here(), "__jobs__": _job_shapes()}))
