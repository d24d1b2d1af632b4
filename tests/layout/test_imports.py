"""The layout's rules, read from the source: imports go down the flow, never in a circle.

The flow is sources → model → checks → scan → fixes / digest → runtime → cli; development
tools sit apart. Each package below may import only the packages listed for it (and
itself, the standard library, third-party packages and `config`). Imports inside
functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BASE = {"model"}
FLOW = ["sources", "state", "matching", "checks", "scan", "fixes", "digest", "runtime"]
ALLOWED: dict[str, set[str]] = {
    "model": set(),
    "sources": {"model"},
    "state": {"model"},
    "matching": {"model", "sources"},
    "checks": {"model", "sources", "matching"},
    "scan": {"model", "sources", "state", "matching", "checks"},
    "fixes": {"model", "sources", "state", "matching", "checks", "scan"},
    "digest": {"model", "sources", "state", "matching", "checks", "scan", "fixes"},
    "runtime": {"model", "sources", "state", "matching", "checks", "scan", "fixes", "digest"},
    # Development tools use the product; the product never uses them (only `oprecon demo`,
    # `generate` and `bench` reach them, through the CLI).
    "devtools": set(FLOW) | BASE,
    "web": set(FLOW) | BASE,
    # `oprecon web` and `oprecon users` start and manage the console.
    "cli": set(FLOW) | BASE | {"devtools", "web"},
}
# config/ is the settings every stage reads; it may look up the check ids, nothing else.
CONFIG_MAY_IMPORT = {"worker.checks.catalog", "worker.checks", "worker"}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path, packages: tuple[str, ...] = ("worker", "tasks", "config")
            ) -> dict[str, Path]:
    found = {}
    for pkg in packages:
        for path in (root / pkg).rglob("*.py"):
            if "migrations" in path.parts:
                continue  # Alembic scripts are loaded by path, not imported
            found[module_name(path, root)] = path
    return found


def imports(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """Every module of ours that `path` imports (at the top or inside a function)."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph(root: Path) -> dict[str, set[str]]:
    known = modules(root)
    return {name: imports(path, name, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def room(module: str) -> str | None:
    """The package under worker/ a module lives in (None for worker/__init__)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "worker" and len(parts) > 1 else None


def violations(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in sorted(edges.items()):
        for dst in sorted(targets):
            top_src, top_dst = src.split(".")[0], dst.split(".")[0]
            if top_src == "worker" and top_dst == "tasks":
                bad.append(f"{src} -> {dst}: worker/ never imports tasks/ (send by name)")
            elif top_src == "config" and top_dst == "worker" and dst not in CONFIG_MAY_IMPORT:
                bad.append(f"{src} -> {dst}: config/ may only read the check catalog")
            elif top_src == "tasks" and room(dst) in {"cli", "devtools", "web"}:
                bad.append(f"{src} -> {dst}: tasks/ call the runtime, not tools or pages")
            elif top_src == top_dst == "worker":
                a, b = room(src), room(dst)
                if a is None or b is None or a == b:
                    continue
                if a not in ALLOWED:
                    bad.append(f"{src}: package worker.{a} has no place in the layout")
                elif b not in ALLOWED[a]:
                    bad.append(f"{src} -> {dst}: worker.{a} may not import worker.{b}")
    return bad


def test_no_import_cycles() -> None:
    assert cycles(graph(ROOT)) == []


def test_imports_only_go_down_the_flow() -> None:
    assert violations(graph(ROOT)) == []


def test_every_package_under_worker_has_a_place() -> None:
    rooms = {p.name for p in (ROOT / "worker").iterdir()
             if p.is_dir() and (p / "__init__.py").exists()}
    assert rooms <= set(ALLOWED), rooms - set(ALLOWED)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for pkg in ("worker", "tasks", "config"):
        (tmp_path / pkg).mkdir(exist_ok=True)
    return tmp_path


def test_the_rules_catch_an_upward_import_and_a_cycle(tmp_path: Path) -> None:
    """The checker itself: a check that imports the scan engine, a scan module that
    imports the CLI (lazily, inside a function), and a two-module cycle are all caught."""
    root = _tree(tmp_path, {
        "worker/__init__.py": "",
        "worker/checks/__init__.py": "",
        "worker/checks/links.py": "from worker.scan.engine import reconcile\n",
        "worker/scan/__init__.py": "",
        "worker/scan/engine.py": "def f():\n    from worker.cli import main\n",
        "worker/cli/__init__.py": "",
        "worker/cli/main.py": "from . import state\n",
        "worker/cli/state.py": "from worker.cli.main import app\n",
        "worker/fixes/__init__.py": "",
        "worker/fixes/staging.py": "from tasks.fixes import apply_fix\n",
        "tasks/__init__.py": "",
        "tasks/fixes.py": "",
    })
    edges = graph(root)
    assert cycles(edges) == [["worker.cli.main", "worker.cli.state"]]
    assert violations(edges) == [
        "worker.checks.links -> worker.scan.engine: worker.checks may not import worker.scan",
        "worker.fixes.staging -> tasks.fixes: worker/ never imports tasks/ (send by name)",
        "worker.scan.engine -> worker.cli: worker.scan may not import worker.cli",
        "worker.scan.engine -> worker.cli.main: worker.scan may not import worker.cli",
    ]
