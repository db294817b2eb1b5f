"""The house rules a reader relies on: no import circles in the package (each module's
imports, TYPE_CHECKING ones included, form a tree of actors), and the pure core loads
without the drawing and widget libraries."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "twodwalk"


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (a package stands for its __init__)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in modules:
                graph[name].add(node.module)
                graph[name] |= {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
    return graph


def cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path start -> ... -> start, if there is one (depth-first, each module once)."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for target in graph[node]:
            if target == start:
                return [*path, start]
            if target not in seen:
                seen.add(target)
                stack.append((target, [*path, target]))
    return None


def test_no_import_circles() -> None:
    graph = import_graph()
    # A package's __init__ may re-export its own submodules: that is not a circle.
    for name, targets in graph.items():
        graph[name] = {t for t in targets if t != name and not t.startswith(name + ".")}
    circles = [c for name in graph if (c := cycle_through(graph, name)) is not None]
    assert circles == [], f"import circles: {circles[:3]}"


def test_core_loads_without_matplotlib_networkx_or_ipywidgets() -> None:
    code = (
        "import sys, twodwalk, twodwalk.scenarios, twodwalk.whatifs, twodwalk.exercises;"
        " print(sorted(m for m in ('matplotlib', 'networkx', 'ipywidgets') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_engine_imports_nothing_built_on_it() -> None:
    """The layers of `ls twodwalk/`: the engine reads only itself and the shared input checks;
    applications, views and widgets are built on it, never the other way round."""
    graph = import_graph()
    engine = {name for name in graph if name.startswith("twodwalk.engine")}
    allowed = engine | {"twodwalk.errors"}
    outward = {name: sorted(graph[name] - allowed) for name in engine if graph[name] - allowed}
    assert outward == {}


def test_flat_engine_paths_are_the_same_modules() -> None:
    """Notebooks import `twodwalk.host`, `twodwalk.kvm.memslots`, `twodwalk.trace`...: the paths
    from before the engine had its own folder name the very same module objects."""
    import importlib

    import twodwalk

    for name in ("host", "kvm", "kvm.memslots", "native", "trace", "machine", "walker"):
        assert importlib.import_module(f"twodwalk.{name}") is importlib.import_module(
            f"twodwalk.engine.{name}"
        )
    assert twodwalk.host is twodwalk.engine.host


def test_the_package_namespace_is_its_public_api() -> None:
    import twodwalk

    assert "importlib" not in dir(twodwalk) and "TYPE_CHECKING" not in dir(twodwalk)
    assert set(dir(twodwalk)) == {*twodwalk.__all__, "widgets"}
    assert all(hasattr(twodwalk, name) for name in twodwalk.__all__)


def test_help_of_machine_names_its_actors() -> None:
    import pydoc

    import twodwalk

    text = pydoc.render_doc(twodwalk.Machine)
    for attribute in ("memory", "host", "vmm", "vm", "guest", "vcpu", "cpu_model", "ram_hva"):
        assert f"`{attribute}`" in text, attribute


def test_realkvm_imports_where_there_is_no_fcntl() -> None:
    """Pyodide and Windows have no fcntl: `twodwalk.realkvm` still imports (as its docstring
    promises), and says why real KVM cannot be used there."""
    code = (
        "import sys; sys.modules['fcntl'] = None\n"
        "import twodwalk.realkvm as r\n"
        "print(r.unavailable_reason()); print(r.check().text)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.count("this Python has no fcntl module") == 2, done.stdout


def test_the_library_does_not_pull_a_jupyter_server() -> None:
    """`pip install twodwalk` into a JupyterHub or a Pyodide kernel brings what the library
    imports; JupyterLab comes with the `lab` extra, which the dev extra (make) includes."""
    import tomllib

    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    required = {d.split(">")[0].split("=")[0] for d in project["dependencies"]}
    assert required == {"ipywidgets", "matplotlib", "networkx"}
    extras = project["optional-dependencies"]
    assert any(d.startswith("jupyterlab") for d in extras["lab"])
    assert "twodwalk[lab]" in extras["dev"]
