"""The package's shape in numbers (docs/ARCHITECTURE.md): import cycles, function-level imports of
calray modules, top-level modules, modules over 500 lines, functions over 60 lines, the Trainer's
length, and imports that go up the layer order.

    python scripts/architecture_figures.py [--check]

Static analysis of calray/ with `ast` (no import is executed). `--check` exits 1 when a figure
misses its target. tests/test_architecture.py enforces the layer order and the cycles.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "calray"
MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_TRAINER_LINES, MAX_TOP_LEVEL = 500, 60, 300, 10
# lowest first; a module may import from lower layers and from its own package only
LAYERS = [
    {"calray", "calray.errors", "calray.io", "calray.registry", "calray.config", "calray.dist"},
    {"calray.data", "calray.models"},
    {"calray.method"},
    {"calray.engine"},
    {"calray.ray"},
    {"calray.robustness"},
    {"calray.report"},
    {"calray.sweep"},
    {"calray.train"},
]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def group(name: str) -> str:
    """The layer unit of a module: its subpackage (calray.engine) or itself (calray.config)."""
    parts = name.split(".")
    if len(parts) >= 2 and (PACKAGE / parts[1]).is_dir():
        return ".".join(parts[:2])
    return name


def layer(name: str) -> int:
    g = group(name)
    for i, members in enumerate(LAYERS):
        if g in members:
            return i
    raise KeyError(f"{name}: not in any layer of scripts/architecture_figures.py's LAYERS")


def resolve(name: str, known: dict[str, Path]) -> str:
    """`from calray.x import y` may name a module (calray.x.y) or an attribute of calray.x."""
    while name not in known and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def calray_imports(tree: ast.AST, known: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported calray module, line, inside a function) for every import statement."""
    out = []
    func_lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    func_lines.add(inner.lineno)
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            if n == "calray" or n.startswith("calray."):
                out.append((resolve(n, known), node.lineno, node.lineno in func_lines))
    return out


def package_imports(tree: ast.AST, known: dict[str, Path]) -> set[str]:
    """`from pkg import sub` also runs pkg/__init__.py: the packages of from-imports (cycle edges)."""
    return {node.module for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in known
            and (node.module == "calray" or node.module.startswith("calray."))}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def figures() -> dict:
    known = modules()
    graph: dict[str, set[str]] = {}
    function_imports, upward, long_functions, long_modules = [], [], [], []
    trainer_lines = 0
    for name, path in known.items():
        text = path.read_text()
        tree = ast.parse(text)
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            long_modules.append((name, lines))
        graph.setdefault(name, set()).update(t for t in package_imports(tree, known) if t != name)
        for target, lineno, in_function in calray_imports(tree, known):
            if target == name or target not in known:
                continue
            graph.setdefault(name, set()).add(target)
            if in_function:
                function_imports.append(f"{name}:{lineno} → {target}")
            if group(target) != group(name) and layer(target) > layer(name):
                upward.append(f"{name}:{lineno} → {target}")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append((f"{name}.{node.name}", n))
            if isinstance(node, ast.ClassDef) and node.name == "Trainer" and name == "calray.engine.trainer":
                trainer_lines = node.end_lineno - node.lineno + 1
    top = sorted(p.name for p in PACKAGE.iterdir() if p.suffix == ".py")
    return {"cycles": find_cycles(graph), "function_imports": function_imports, "upward_imports": upward,
            "top_level_modules": top, "long_modules": sorted(long_modules, key=lambda x: -x[1]),
            "long_functions": sorted(long_functions, key=lambda x: -x[1]), "trainer_lines": trainer_lines}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 when a figure misses its target")
    args = p.parse_args(argv)
    f = figures()
    rows = [
        ("import cycles", len(f["cycles"]), 0),
        ("function-level imports of calray modules", len(f["function_imports"]), 0),
        ("imports up the layer order", len(f["upward_imports"]), 0),
        ("top-level modules in calray/", len(f["top_level_modules"]), MAX_TOP_LEVEL),
        (f"modules over {MAX_MODULE_LINES} lines", len(f["long_modules"]), 0),
        (f"functions over {MAX_FUNCTION_LINES} lines", len(f["long_functions"]), 0),
        ("Trainer class lines", f["trainer_lines"], MAX_TRAINER_LINES),
    ]
    for label, value, target in rows:
        ok = value <= target
        print(f"{label:45s} {value:5d}  (target ≤ {target}){'' if ok else '  MISSED'}")
    for key in ("cycles", "function_imports", "upward_imports", "long_modules", "long_functions"):
        for item in f[key]:
            print(f"  {key}: {item}")
    print(f"  top-level modules: {', '.join(f['top_level_modules'])}")
    return 1 if args.check and any(v > t for _, v, t in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
