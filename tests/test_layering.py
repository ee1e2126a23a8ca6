"""Every import inside ``treerpo/`` against the table of allowed imports in ``docs/architecture.md``: no arrow points
up a floor and there is no circle."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "treerpo"
DOC = ROOT / "docs" / "architecture.md"
ROW = re.compile(r"^\|\s*`(\w+)`\s*\|[^|]*\|\s*(.+?)\s*\|\s*$")


def allowed_imports() -> dict[str, set[str]]:
    """unit -> the units it may import, from the table under ``## Packages and their imports``."""
    section = DOC.read_text().split("## Packages and their imports", 1)[1].split("\n## ", 1)[0]
    table = {}
    for line in section.splitlines():
        match = ROW.match(line)
        if match:
            unit, imports = match.groups()
            table[unit] = set() if imports == "nothing" else set(re.findall(r"`(\w+)`", imports))
    return table


def unit_of(path: Path) -> str:
    """``treerpo/engine/kv_pool.py`` -> ``engine``; ``treerpo/config.py`` -> ``config``."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imported_modules(path: Path, text: str | None = None) -> list[str]:
    """Absolute names of what the module at ``path`` imports (relative imports resolved), including
    ``import_module`` of a literal name."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    names = []
    for node in ast.walk(ast.parse(path.read_text() if text is None else text, str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            # ``from package import name``: the name may be a module of the package (from treerpo import training)
            names += [module] + [
                f"{module}.{alias.name}" for alias in node.names if not node.module or "." not in module
            ]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            names.append(str(node.args[0].value))
    return names


def treerpo_unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "treerpo" and len(parts) > 1 else None


def actual_imports() -> dict[str, dict[str, list[str]]]:
    """unit -> {imported unit: [files importing it]}, across units only."""
    found: dict[str, dict[str, list[str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if (
            path.resolve().is_relative_to((ROOT / "kernels").resolve())
            or path.name == "__init__.py"
            and path.parent == PACKAGE
        ):
            continue  # kernels/: tests/test_backend_registry.py; treerpo/__init__.py: the lazy public names
        unit = unit_of(path)
        for module in imported_modules(path):
            target = treerpo_unit(module)
            if target and target != unit:
                found.setdefault(unit, {}).setdefault(target, []).append(str(path.relative_to(ROOT)))
    return found


def test_the_table_covers_every_unit_and_has_no_circle():
    table = allowed_imports()
    units = {unit_of(p) for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or p.name != "__init__.py"}
    assert units <= set(table), f"units missing from docs/architecture.md: {sorted(units - set(table))}"
    state: dict[str, str] = {}

    def visit(unit, path):
        assert state.get(unit) != "open", f"a circle in the table: {' -> '.join(path + [unit])}"
        if state.get(unit) is None:
            state[unit] = "open"
            for nxt in sorted(table.get(unit, ())):
                visit(nxt, path + [unit])
            state[unit] = "done"

    for unit in sorted(table):
        visit(unit, [])


def test_every_import_is_allowed_by_the_table():
    table = allowed_imports()
    wrong = {
        f"{unit} -> {target}": files
        for unit, targets in actual_imports().items()
        for target, files in targets.items()
        if target not in table.get(unit, set())
    }
    assert not wrong, f"imports that docs/architecture.md does not allow: {wrong}"


def test_the_checker_sees_a_forbidden_import():
    """The parser resolves relative imports and import_module, so a violation cannot hide behind either."""
    text = (
        "from ..training import trainer\nfrom .kv_pool import KVPool\nimport importlib\n"
        "importlib.import_module('treerpo.runtime.resume')\nfrom treerpo import data\n"
    )
    names = imported_modules(PACKAGE / "engine" / "example.py", text)
    expected = {
        "treerpo.training": "training",
        "treerpo.engine.kv_pool": "engine",
        "importlib": None,
        "treerpo.runtime.resume": "runtime",
        "treerpo": None,
        "treerpo.data": "data",
    }
    assert sorted(names) == sorted(expected)
    assert {n: treerpo_unit(n) for n in names} == expected
