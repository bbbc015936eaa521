"""The package's import graph: every import of every module (function-local ones included, read
with `ast`) points down or sideways in the layer order written in docs/ARCHITECTURE.md, and no
modules import each other in a cycle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "adaparse_jax"


def layers() -> dict[str, int]:
    """{top-level module or subpackage: layer} from the ```layers block of docs/ARCHITECTURE.md."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "docs/ARCHITECTURE.md has no ```layers block"
    out = {}
    for line in block.group(1).splitlines():
        m = re.match(r"\s*(\d+):\s*(.*?)\s*(#.*)?$", line)
        if m:
            out.update({name: int(m.group(1)) for name in m.group(2).split()})
    return out


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, known: dict) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str, path: Path, known: dict) -> set[str]:
    """The package modules `module` imports, anywhere in its file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "adaparse_jax":
                target = _resolve(name, known)
                if target and target != module:
                    out.add(target)
    return out


def _layer_name(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items()}


def test_every_module_has_a_layer():
    order = layers()
    missing = sorted({_layer_name(m) for m in modules()} - set(order))
    assert not missing, f"modules without a layer in docs/ARCHITECTURE.md's ```layers block: {missing}"


def test_no_import_points_up():
    order = layers()
    upward = [f"{a} (layer {order[_layer_name(a)]}) imports {b} (layer {order[_layer_name(b)]})"
              for a, targets in graph().items() for b in sorted(targets)
              if order.get(_layer_name(b), -1) > order.get(_layer_name(a), 99)]
    assert not upward, "imports against the layer order:\n  " + "\n  ".join(upward)


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n  " + "\n  ".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_function_local_and_relative_imports(tmp_path):
    known = {"adaparse_jax.zoo.probe": None, "adaparse_jax.scoring": None, "adaparse_jax.zoo": None,
             "adaparse_jax.zoo.schema": None}
    src = tmp_path / "probe.py"
    src.write_text("def f():\n    from adaparse_jax import scoring\n\nfrom . import schema\n")
    assert imports("adaparse_jax.zoo.probe", src, known) == {"adaparse_jax.scoring", "adaparse_jax.zoo.schema"}
