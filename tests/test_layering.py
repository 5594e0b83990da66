"""The layering ARCHITECTURE.md states: its module map, read top to bottom, is the import order.

Every import inside the package (module level or inside a function) must go to a unit listed above
the importing one, and every unit of the package must be in the map. Review 54 found three imports
going the other way (patch -> evaluate and profile, analysis -> bench) and three files missing from
the map.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _map_order() -> list[str]:
    """Units in the order ARCHITECTURE.md's map lists them (sinkfix.kernels, sinkfix.errors, ...)."""
    order = []
    for line in (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("kernels/"):
            order.append("sinkfix.kernels")
        match = re.match(r"sinkfix/(\w+)", line)
        if match:
            order.append(f"sinkfix.{match.group(1)}")
            if "cli.py" in line.split("  ")[0]:
                order.append("sinkfix.cli")
    return order


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return None if parts[0] != "sinkfix" or len(parts) < 2 else f"sinkfix.{parts[1]}"


def _package_units() -> set[str]:
    units = {f"sinkfix.{p.stem}" for p in (ROOT / "sinkfix").iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists())) and p.stem != "__init__"}
    return units | {"sinkfix.kernels"}


def _imports() -> list[tuple[str, str, str, int]]:
    """(importing unit, imported unit, file, line) for every sinkfix import in the package."""
    found = []
    sources = [(p, None if p == ROOT / "sinkfix" / "__init__.py" else _unit(".".join(p.relative_to(ROOT).with_suffix("").parts)))
               for p in (ROOT / "sinkfix").rglob("*.py")]
    sources += [(p, "sinkfix.kernels") for p in (ROOT / "kernels").rglob("*.py")]
    for path, source in sources:
        if source is None:  # sinkfix/__init__.py: the public namespace, re-exports from every layer
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
                if node.module == "sinkfix":  # from sinkfix import files (a module; __version__ is the root's)
                    names = [f"sinkfix.{alias.name}" for alias in node.names
                             if f"sinkfix.{alias.name}" in _package_units()]
            for name in names:
                target = _unit(name)
                if target is not None and target != source:
                    found.append((source, target, str(path.relative_to(ROOT)), node.lineno))
    return found


def test_every_unit_of_the_package_is_in_the_map():
    order = _map_order()
    assert len(order) == len(set(order)), order
    missing = _package_units() - set(order) - {"sinkfix.__main__"}
    assert not missing, f"not in ARCHITECTURE.md's map: {sorted(missing)}"


def test_imports_go_only_to_units_above():
    position = {unit: i for i, unit in enumerate(_map_order())}
    position["sinkfix.__main__"] = position["sinkfix.cli"] + 1  # python -m sinkfix: the console script
    upward = [f"{source} -> {target} ({where}:{line})" for source, target, where, line in _imports()
              if target in position and source in position and position[target] >= position[source]]
    unknown = sorted({f"{source} -> {target}" for source, target, _, _ in _imports()
                      if target not in position or source not in position})
    assert not upward, "imports against ARCHITECTURE.md's order:\n" + "\n".join(upward)
    assert not unknown, unknown
