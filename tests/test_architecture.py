"""The module map in docs/concepts.md is true: parts, their modules, and imports that flow one way.

Read from the source with ``ast`` (no package import), so the test sees lazy imports inside
functions too.
"""
from __future__ import annotations

import ast
import re
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "sharded_fused_adam"
MAX_TOP_LEVEL_MODULES = 10


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _part(module: str) -> str:
    """``sharded_fused_adam.core.bucket`` -> ``core/``; ``sharded_fused_adam.optimizer`` -> ``optimizer.py``."""
    bits = module.split(".")
    if len(bits) == 1:
        return "__init__.py"
    return bits[1] + "/" if (PKG / bits[1]).is_dir() else bits[1] + ".py"


def _imported_modules(path: Path) -> set[str]:
    """Every package module ``path`` imports, at any depth of its code."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("sharded_fused_adam"):
                continue
            for alias in node.names:  # "from . import x" imports the module x
                candidate = f"{target}.{alias.name}"
                as_path = REPO / candidate.replace(".", "/")
                found.add(candidate if as_path.with_suffix(".py").exists() or as_path.is_dir() else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("sharded_fused_adam")}
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imported_modules(p) for p in PKG.rglob("*.py")}


def _documented_map() -> list[tuple[str, set[str], set[str]]]:
    """``(part, modules, imported parts)`` rows of the module map, in order."""
    text = (REPO / "docs" / "concepts.md").read_text()
    section = text[text.index("## Module map"):]
    rows = []
    for line in section.splitlines()[1:]:
        if line.startswith("## "):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`"):
            continue
        ticks = [set(re.findall(r"`([^`]+)`", c)) for c in cells]
        rows.append((cells[0].strip("`"), ticks[1], ticks[3]))
    return rows


def test_every_part_imports_exactly_what_the_map_says_and_only_from_rows_above():
    rows = _documented_map()
    order = [part for part, _, _ in rows]
    actual: dict[str, set[str]] = defaultdict(set)
    for module, targets in _graph().items():
        for target in targets:
            if _part(target) != _part(module):
                actual[_part(module)].add(_part(target))
    for part, _, documented in rows:
        got = actual.pop(part, set())
        assert got == documented, f"{part}: imports {sorted(got)}, the module map says {sorted(documented)}"
        above = set(order[: order.index(part)])
        assert documented <= above, f"{part} imports {sorted(documented - above)}, which are not above it"
    actual.pop("__init__.py", None)  # the public API may import any part
    assert not actual, f"parts missing from the module map: {sorted(actual)}"


def test_every_module_of_a_part_is_listed():
    for part, modules, _ in _documented_map():
        if not part.endswith("/"):
            assert (PKG / part).is_file(), part
            continue
        folder = PKG / part
        present = {p.stem for p in folder.glob("*.py") if p.name != "__init__.py"}
        present |= {f"{d.name}/" for d in folder.iterdir() if (d / "__init__.py").is_file()}
        assert present == modules, f"{part}: modules {sorted(present)}, the map lists {sorted(modules)}"


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if target.startswith(module + ".") or module.startswith(target + "."):
                continue  # a package and its own modules
            if state.get(target) == 1:
                raise AssertionError(" -> ".join(path[path.index(target):] + [target]))
            if target in graph and state.get(target) is None:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if state.get(module) is None:
            visit(module, [module])


def test_the_top_level_stays_small():
    top = sorted(p.name for p in PKG.glob("*.py") if p.name != "__init__.py")
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


def test_the_map_check_sees_a_wrong_import(tmp_path, monkeypatch):
    """The checker itself: an undocumented upward import is reported (a test that cannot fail is a defect)."""
    fake = tmp_path / "sharded_fused_adam"
    for source in PKG.rglob("*.py"):
        target = fake / source.relative_to(PKG)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(source.read_text())
    (fake / "core" / "layout.py").write_text((fake / "core" / "layout.py").read_text()
                                             + "\nfrom ..optimizer import ShardedFusedAdam\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "concepts.md").write_text((REPO / "docs" / "concepts.md").read_text())
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PKG", fake)
    try:
        test_every_part_imports_exactly_what_the_map_says_and_only_from_rows_above()
    except AssertionError as exc:
        assert "core/" in str(exc)
    else:
        raise AssertionError("an import of optimizer.py from core/ went unnoticed")
