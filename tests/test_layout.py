"""The packages import one way, lowest first, and no module imports itself back through another."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A package may import from packages of a lower rank and from itself; scripts and bench/ sit above them all.
RANKS = {"utils": 0, "loss": 1, "models": 2, "dataset": 2, "sampling": 3, "weights": 3, "evaluation": 4,
         "training": 5}
SCRIPTS = sorted(path.stem for path in ROOT.glob("*.py"))


def project_imports(path):
    """Project modules imported anywhere in the file (function-local imports too), as dotted names."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        imported.update(name for name in names if name.split(".")[0] in (*RANKS, *SCRIPTS, "bench"))
    return imported


def modules():
    """{dotted name: path} of every library module."""
    return {".".join(path.relative_to(ROOT).with_suffix("").parts): path
            for package in RANKS for path in sorted((ROOT / package).glob("*.py"))}


def test_every_package_has_a_rank():
    assert {path.parent.name for path in ROOT.glob("*/__init__.py")} == set(RANKS)


def test_packages_import_only_lower_packages():
    upward = []
    for name, path in modules().items():
        package = name.split(".")[0]
        for imported in project_imports(path):
            target = imported.split(".")[0]
            if target != package and RANKS.get(target, 99) >= RANKS[package]:
                upward.append(f"{name} imports {imported}")
    assert not upward


def test_scripts_import_no_script_and_tests_no_bench():
    for script in SCRIPTS:
        assert not project_imports(ROOT / f"{script}.py") & set(SCRIPTS), script
    for path in (ROOT / "tests").glob("*.py"):
        assert not [name for name in project_imports(path) if name.split(".")[0] == "bench"], path.name


def test_no_import_circles():
    known = modules()
    graph = {name: {imported for imported in project_imports(path) if imported in known}
             for name, path in known.items()}
    state = {}

    def visit(name, trail):
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", " -> ".join([*trail, name])
        state[name] = "open"
        for imported in graph[name]:
            visit(imported, [*trail, name])
        state[name] = "done"

    for name in graph:
        visit(name, [])
