"""Strict layering of the project's own modules, read from the source with `ast` (nothing is imported).

Layers, lowest first (an import may point down or sideways, never up, and never close a cycle):

  0 base          toolkit.config (+ config_schema, config_d2llm), toolkit.errors, toolkit.recipe_paths
  1 shared        toolkit.models, objectives, distributed, checkpoint, optim, assets, asset_splits,
                  atomic, training_log, fault_injection; data_pipelines
  2 engines       toolkit.engines
  3 applications  toolkit.train, eval, planner, dry_run, teacher, search
  4 entry points  launchers, cluster

Every import of a project module counts, at module level or inside a function; only imports under
`if TYPE_CHECKING:` (type hints) are ignored. In toolkit/ and data_pipelines/ an import belongs at
module level: a function-level one hides an edge (usually one that would close a cycle). Lazy imports
of heavy third-party code (megatron, deepspeed, ray) are fine: they are not project imports.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("toolkit", "data_pipelines", "launchers", "cluster")
BASE, SHARED, ENGINES, APPS, ENTRY = range(5)
LAYER_NAMES = {BASE: "base", SHARED: "shared", ENGINES: "engines", APPS: "applications", ENTRY: "entry points"}
# Longest matching prefix wins; every project module must match one (a new top-level module of
# toolkit/ has to be placed here deliberately).
LAYERS = {
    "toolkit.config": BASE,
    "toolkit.config_schema": BASE,
    "toolkit.config_d2llm": BASE,
    "toolkit.errors": BASE,
    "toolkit.recipe_paths": BASE,
    "toolkit": SHARED,  # the package itself (its __init__)
    "toolkit.models": SHARED,
    "toolkit.objectives": SHARED,
    "toolkit.distributed": SHARED,
    "toolkit.checkpoint": SHARED,
    "toolkit.optim": SHARED,
    "toolkit.assets": SHARED,
    "toolkit.asset_splits": SHARED,
    "toolkit.atomic": SHARED,
    "toolkit.training_log": SHARED,
    "toolkit.run_layout": SHARED,
    "toolkit.seeds": SHARED,
    "toolkit.fault_injection": SHARED,
    "data_pipelines": SHARED,
    "toolkit.engines": ENGINES,
    "toolkit.train": APPS,
    "toolkit.run_settings": APPS,
    "toolkit.eval": APPS,
    "toolkit.planner": APPS,
    "toolkit.dry_run": APPS,
    "toolkit.teacher": APPS,
    "toolkit.search": APPS,
    "launchers": ENTRY,
    "cluster": ENTRY,
}
# Function-level project imports that stay, each with its reason (keep this short).
ALLOWED_LOCAL: dict[tuple[str, str], str] = {
    # st_pooling subclasses a sentence-transformers module: importing it costs ~8 s, which every
    # importer of Encoder (each training rank) would pay; only writing a folder needs it.
    ("toolkit/models/export.py", "toolkit.models.st_pooling"): "lazy: sentence-transformers",
    # attention subclasses megatron-core's DotProductAttention: importing megatron costs ~3 s, which
    # model.py (imported by the engine registry) defers to building a backbone, as its other imports do.
    ("toolkit/engines/megatron/model.py", "toolkit.engines.megatron.attention"): "lazy: megatron-core",
}
# Known violations being removed (each entry deleted with its fix; the stale-entry check enforces it).
# Ignored by every check below (cycle, layer, function-level).
PENDING: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Edge:
    src: str  # importing module
    dst: str  # imported project module
    file: str  # path relative to ROOT
    line: int
    local: bool  # inside a function


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_files(root: Path = ROOT) -> dict[str, Path]:
    files = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            files[module_name(path, root)] = path
    return files


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """(node, inside a function) for every import not under `if TYPE_CHECKING:`."""
    def walk(node: ast.AST, local: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.orelse:
                    yield from walk_one(sub, local)
                continue
            yield from walk_one(child, local)

    def walk_one(node: ast.AST, local: bool):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, local
        yield from walk(node, local or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    yield from walk(tree, False)


def _resolve(name: str, modules: set[str]) -> str | None:
    """The project module an import of `name` loads (its longest existing prefix), or None."""
    if name.split(".")[0] not in PACKAGES:
        return None
    parts = name.split(".")
    while parts and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts) if parts else None


def collect(root: Path = ROOT) -> tuple[list[Edge], dict[str, list[tuple[str, int]]]]:
    """Project import edges (one per import statement and target), and every module's imported names
    (third-party ones included, for the no-Ray rule)."""
    files = project_files(root)
    modules = set(files)
    edges, raw = [], {}
    for mod, path in files.items():
        rel = path.relative_to(root).as_posix()
        is_pkg = path.name == "__init__.py"
        raw[mod] = []
        for node, local in _imports(ast.parse(path.read_text(), filename=rel)):
            targets = []
            if isinstance(node, ast.Import):
                for alias in node.names:
                    raw[mod].append((alias.name, node.lineno))
                    targets.append(_resolve(alias.name, modules))
            else:
                if node.level:  # relative: from the package of this module
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                raw[mod].append((base, node.lineno))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else _resolve(base, modules))
            for dst in dict.fromkeys(targets):
                if dst and dst != mod:
                    edges.append(Edge(mod, dst, rel, node.lineno, local))
    return edges, raw


def layer_of(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    raise KeyError(module)


EDGES, RAW = collect()
CHECKED = [e for e in EDGES if (e.file, e.dst) not in PENDING]


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in project_files() if not any(
        m == p or m.startswith(p + ".") for p in LAYERS))
    assert not unplaced, f"modules without a layer (add them to LAYERS in {Path(__file__).name}): {unplaced}"


def test_parser_sees_every_kind_of_import(tmp_path):
    """Guards the parser itself on a small tree: each kind of import statement gives its edge."""
    files = {
        "toolkit/__init__.py": "",
        "toolkit/config.py": "",
        "toolkit/models/__init__.py": "",
        "toolkit/models/a.py": "import os\nfrom toolkit.config import X\nimport toolkit.models.b as bee\n",
        "toolkit/models/b.py": (
            "from typing import TYPE_CHECKING\nfrom toolkit.models import a, missing\nfrom . import c\n"
            "if TYPE_CHECKING:\n    from toolkit.train import T\nelse:\n    from .c import f\n"
            "def g():\n    import ray\n    from ..config import Y\n"),
        "toolkit/models/c.py": "",
        "toolkit/train.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    edges, raw = collect(tmp_path)
    assert {(e.src, e.dst, e.line, e.local) for e in edges} == {
        ("toolkit.models.a", "toolkit.config", 2, False),  # from x import name
        ("toolkit.models.a", "toolkit.models.b", 3, False),  # import x.y as z
        ("toolkit.models.b", "toolkit.models.a", 2, False),  # from package import submodule
        ("toolkit.models.b", "toolkit.models", 2, False),  # ... and a name of the package
        ("toolkit.models.b", "toolkit.models.c", 3, False),  # relative
        ("toolkit.models.b", "toolkit.models.c", 7, False),  # the else of `if TYPE_CHECKING` counts
        ("toolkit.models.b", "toolkit.config", 10, True),  # relative, two levels, inside a function
    }  # the TYPE_CHECKING import of toolkit.train is not an edge
    assert ("ray", 9) in raw["toolkit.models.b"] and ("os", 1) in raw["toolkit.models.a"]


def find_cycle(edges: list[Edge]) -> list[str] | None:
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.src, set()).add(e.dst)
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_reports_the_cycle():
    e = [Edge("a", "b", "a.py", 1, False), Edge("b", "c", "b.py", 1, True), Edge("c", "a", "c.py", 1, False)]
    assert find_cycle(e) == ["a", "b", "c", "a"] and find_cycle(e[:2]) is None


def test_no_import_cycles():
    cycle = find_cycle(CHECKED)
    if cycle:
        where = [f"{e.file}:{e.line}" for a, b in zip(cycle, cycle[1:]) for e in CHECKED if (e.src, e.dst) == (a, b)]
        pytest.fail(f"import cycle: {' -> '.join(cycle)} (at {', '.join(where)})")


def test_imports_point_down_or_sideways():
    bad = [f"{e.file}:{e.line}: {e.src} ({LAYER_NAMES[layer_of(e.src)]}) imports {e.dst} "
           f"({LAYER_NAMES[layer_of(e.dst)]})" for e in CHECKED if layer_of(e.dst) > layer_of(e.src)]
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(bad)


def test_no_function_level_project_imports_in_the_library():
    bad = [f"{e.file}:{e.line}: imports {e.dst} inside a function" for e in CHECKED
           if e.local and e.file.startswith(("toolkit/", "data_pipelines/")) and (e.file, e.dst) not in ALLOWED_LOCAL]
    assert not bad, ("function-level project imports (move them to module level, or fix the layering "
                     "that needs them hidden):\n" + "\n".join(bad))


def test_allowlists_are_not_stale():
    seen = {(e.file, e.dst) for e in EDGES if e.local}
    stale = sorted(k for k in (set(ALLOWED_LOCAL) | PENDING) if k not in seen)
    assert not stale, f"allowlist entries with no such function-level import any more (delete them): {stale}"


def test_library_never_imports_launchers_cluster_or_ray():
    bad = [f"{module}: imports {name} (line {line})" for module, imports in RAW.items()
           if module.split(".")[0] in ("toolkit", "data_pipelines")
           for name, line in imports if name.split(".")[0] in ("ray", "launchers", "cluster")]
    assert not bad, "the training library knows no launcher (no Ray, no SLURM code):\n" + "\n".join(bad)


DATA_MAY_IMPORT = ("toolkit.config", "toolkit.errors", "toolkit.atomic", "toolkit.assets", "toolkit.asset_splits")


def test_data_layer_knows_no_model_code():
    """data_pipelines shares the shared layer with models / objectives but imports none of them: code that
    needs a model (dense mining) takes it as a function from its caller."""
    bad = [f"{e.file}:{e.line}: imports {e.dst}" for e in CHECKED if e.src.startswith("data_pipelines")
           and e.dst.startswith("toolkit") and not e.dst.startswith(DATA_MAY_IMPORT)]
    assert not bad, f"data_pipelines may import only {DATA_MAY_IMPORT} from toolkit:\n" + "\n".join(bad)
