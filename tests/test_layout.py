"""The packages form layers (docs/CONTRIBUTING.md): each imports only the layers below it, and
no modules import each other in a circle. Read from the source with `ast`, imports inside
functions and `TYPE_CHECKING` blocks included: a lazy import is still a dependency."""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("speech", "vision", "demo", "fusion", "app", "lab")
# what each package may import (besides itself and third-party code)
ALLOWED = {
    "speech": set(),
    "vision": set(),
    "demo": {"speech"},                      # the demo world: scenes, questions, answers, voices
    "fusion": {"speech", "vision"},          # the model: what live/serve/replay need to run it
    "app": {"fusion", "speech", "vision", "demo"},
    "lab": {"app", "fusion", "speech", "vision", "demo"},   # making and measuring models
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Project modules `path` imports (absolute names; relative imports resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            # `from pkg import module` names a module too
            found |= {f"{mod}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    g = {}
    for mod, path in modules.items():
        deps = set()
        for m in imports_of(path):
            while m and m not in modules:        # `pkg.module.Name` -> `pkg.module`
                m = m.rpartition(".")[0]
            if m and m != mod and m not in PACKAGES:   # package __init__s import nothing
                deps.add(m)
        g[mod] = deps
    return g


def test_each_package_imports_only_the_layers_below_it():
    bad = [f"{mod} imports {dep}" for mod, deps in graph().items() for dep in sorted(deps)
           if dep.split(".")[0] != mod.split(".")[0]
           and dep.split(".")[0] not in ALLOWED[mod.split(".")[0]]]
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_no_import_circles():
    g = graph()
    # packages' __init__ modules import nothing here; a circle is a path from a module to itself
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The two checks above can fail: a lazy upward import and a two-module circle are found."""
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "fusion" / "a.py").write_text("def f():\n    from app import server\n")
    (tmp_path / "app" / "server.py").write_text("from . import x\n")
    (tmp_path / "app" / "x.py").write_text("from .server import y\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    g = graph()
    assert "app.server" in g["fusion.a"]
    assert g["app.server"] == {"app.x"} and g["app.x"] == {"app.server"}
    _fails_with(test_each_package_imports_only_the_layers_below_it, "fusion.a imports app.server")
    _fails_with(test_no_import_circles, "app.server -> app.x -> app.server")


def _fails_with(check, message: str) -> None:
    try:
        check()
    except AssertionError as e:
        assert message in str(e), str(e)
    else:
        raise AssertionError(f"{check.__name__} passed on a tree with {message!r}")
