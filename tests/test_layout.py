"""The house's rules, read from the source (every import, those inside functions included): no import cycle,
each floor imports only from the floors below it, and no module imports another package's private names."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "esm_gearnet"
# lowest first; a module of a floor may import from its own floor and those listed before it
FLOORS = [
    ("errors", "config", "registry", "checkpoint", "distributed", "metrics", "writing"),
    ("data", "layers"),
    ("models",),
    ("tasks",),
    ("engine",),
    ("assembly",),
    ("commands", "__main__"),
]


def modules():
    """{dotted name: (file, is a package's __init__)} of every module of the package."""
    found = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        parts = list(file.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (file, is_package)
    return found


def imports(name, file, is_package, known):
    """(imported module, imported name or None) of every import in `file` that reaches into the package."""
    package = name if is_package else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            yield from ((alias.name, None) for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                if f"{target}.{alias.name}" in known:  # a submodule
                    yield f"{target}.{alias.name}", None
                elif target in known:
                    yield target, alias.name


def graph():
    known = modules()
    return {name: list(imports(name, file, is_package, known)) for name, (file, is_package) in known.items()}


def floor_of(module: str) -> int:
    part = module.split(".")[1] if "." in module else ""
    return next((level for level, names in enumerate(FLOORS) if part in names), -1)  # -1: the package root


def test_no_import_cycle():
    edges = {name: {target for target, _ in found} for name, found in graph().items()}
    state, path = {}, []

    def visit(name):  # depth first; a module met again while on the path closes a cycle
        state[name] = "open"
        path.append(name)
        for target in sorted(edges[name]):
            assert state.get(target) != "open", "import cycle: " + " -> ".join(path[path.index(target):] + [target])
            if target not in state:
                visit(target)
        path.pop()
        state[name] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name)


def test_each_floor_imports_only_from_below():
    upward = [f"{name} imports {target}" for name, found in graph().items() for target, _ in found
              if floor_of(name) >= 0 and floor_of(target) > floor_of(name)]
    assert not upward, "; ".join(upward)


def test_no_private_name_is_imported_from_another_package():
    reaching = [f"{name} imports {target}.{what}" for name, found in graph().items() for target, what in found
                if what and what.startswith("_") and not what.startswith("__")
                and target.rsplit(".", 1)[0] != (name if modules()[name][1] else name.rsplit(".", 1)[0])
                and target != name.rsplit(".", 1)[0]]
    assert not reaching, "; ".join(reaching)


def test_the_rules_catch_what_they_look_for(tmp_path, monkeypatch):
    """A planted upward import, cycle and private import are each found (the tests above cannot pass vacuously)."""
    root = tmp_path / "esm_gearnet"
    (root / "models").mkdir(parents=True)
    (root / "commands").mkdir()
    for package in (root, root / "models", root / "commands"):
        (package / "__init__.py").write_text("")
    (root / "models" / "a.py").write_text("from ..commands import b\n")
    (root / "commands" / "b.py").write_text("def f():\n    from ..models.a import _hidden\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", root)
    edges = graph()
    assert ("esm_gearnet.commands.b", None) in edges["esm_gearnet.models.a"]
    assert ("esm_gearnet.models.a", "_hidden") in edges["esm_gearnet.commands.b"]
    for test in (test_no_import_cycle, test_each_floor_imports_only_from_below,
                 test_no_private_name_is_imported_from_another_package):
        try:
            test()
        except AssertionError:
            continue
        raise AssertionError(f"{test.__name__} missed its planted fault")
