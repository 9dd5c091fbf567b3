"""The house rules a reader relies on (docs/style.md, README "What is inside"), read from the source:
no import cycle in nanocausal/ (imports inside functions included), no script imports a script, no
library file a reader cannot finish in one sitting."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "nanocausal"
SCRIPTS = sorted(ROOT.glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))


def module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path, known):
    """The names in `known` that the file imports anywhere (top level or inside a function)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names & known


def test_the_library_has_no_import_cycle():
    modules = {module_name(p): p for p in LIBRARY.rglob("*.py")}
    graph = {name: imported(path, set(modules)) - {name} for name, path in modules.items()}
    state = {}  # name -> "open" while on the current path, "done" after

    def visit(name, path):
        state[name] = "open"
        for dep in sorted(graph[name]):
            assert state.get(dep) != "open", "import cycle: " + " -> ".join(path + [dep])
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_no_script_imports_a_script():
    scripts = {p.stem for p in ROOT.glob("*.py")}
    for path in SCRIPTS:
        assert not imported(path, scripts), f"{path.relative_to(ROOT)} imports {imported(path, scripts)}"


def test_every_library_file_reads_in_one_sitting():
    long = {str(p.relative_to(ROOT)): n for p in LIBRARY.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"over 500 lines: {long}"
