"""The library stands alone: `import pycosdist` needs torch + numpy only, no library module imports
the application (pycosdist.denoise), the 0.1 import paths still work with a warning, the
command line without the [train] extra says what to install, and no module of the package imports
itself back through others (an import circle; imports inside functions count too)."""

from __future__ import annotations

import ast
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

import pycosdist

PKG = Path(pycosdist.__file__).parent
ENV_PATH = str(PKG.parent)  # the pycosdist this test imported (installed or in-place)
TRAINING_STACK = ("pesq", "pystoi", "soundfile", "matplotlib", "scipy", "tqdm", "espeakng_loader", "threadpoolctl")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/",
                          env={"PYTHONPATH": ENV_PATH, "PATH": "/usr/bin:/bin"})


def test_import_loads_nothing_of_the_training_stack():
    proc = _run("import sys, torch\nbefore = set(sys.modules)\nimport pycosdist, pycosdist.features\n"
                "print(sorted(m for m in set(sys.modules) - before))")
    assert proc.returncode == 0, proc.stderr
    added = eval(proc.stdout.strip().splitlines()[-1])
    assert not [m for m in added if m.split(".")[0] in TRAINING_STACK], added
    assert not [m for m in added if m.startswith("pycosdist.denoise")], added


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names += [base] + [f"{base}.{a.name}" for a in node.names]
    return names


@pytest.mark.parametrize("module", sorted(p.name for p in PKG.glob("*.py") if p.name not in ("__main__.py",)))
def test_no_library_module_imports_the_application(module):
    offending = [n for n in _imports(PKG / module) if "denoise" in n or n.split(".")[0] in TRAINING_STACK]
    assert not offending, f"pycosdist/{module} imports {offending}"


def test_old_import_paths_alias_the_new_modules_with_a_warning():
    proc = _run("import warnings\nwarnings.simplefilter('error', DeprecationWarning)\n"
                "try:\n    import pycosdist.training\nexcept DeprecationWarning as e:\n    print('warned:', e)\n"
                "warnings.simplefilter('ignore')\nfrom pycosdist import training, denoise\n"
                "import pycosdist.denoise.training as new\nprint(training is new)")
    assert proc.returncode == 0, proc.stderr
    assert "warned: `pycosdist.training` moved to `pycosdist.denoise.training`" in proc.stdout
    assert proc.stdout.strip().endswith("True")


def test_cli_without_the_train_extra_says_which_extra_to_install():
    proc = _run("import sys\nsys.modules['pesq'] = None  # as if pesq were not installed\n"
                "from pycosdist.denoise.cli import main\nsys.exit(main(['--help']))")
    assert proc.returncode == 2
    assert "[train]" in proc.stderr and "pesq" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- import circles --------------------------------------------------------------------------------
def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """``{module: modules it imports}`` over the modules of the package at ``root`` (named
    ``package``): every ``import`` and ``from ... import`` in a file, at module level or inside a
    function, that names a module of the package. ``from P import n`` is an edge to ``P.n`` when that
    is a module, else to ``P`` itself (a name its ``__init__`` defines)."""
    modules = {}
    for path in root.rglob("*.py"):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    for path in root.rglob("*"):  # compiled extension modules (pycosdist._C): imported, importing nothing
        if path.name.endswith(tuple(EXTENSION_SUFFIXES)):
            parts = [package, *path.relative_to(root).parent.parts, path.name.split(".")[0]]
            modules[".".join(parts)] = (None, False)

    def known(name: str) -> str | None:  # ``name`` or its longest prefix that is a module of the package
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, (path, is_package) in modules.items():
        if path is None:
            graph[name] = set()
            continue
        here = name if is_package else name.rpartition(".")[0]  # what a level-1 relative import starts from
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {known(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = here.rsplit(".", node.level - 1)[0] if node.level else ""
                source = ".".join(p for p in (base, node.module or "") if p)
                targets |= {known(f"{source}.{a.name}") if f"{source}.{a.name}" in modules else known(source)
                            for a in node.names}
        graph[name] = targets - {None, name}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every circle of ``graph`` as one cycle through each strongly connected component of more than
    one module: ``[a, b, ..., a]``, each importing the next."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def connect(v):  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the alphabetically first module of a strongly connected component."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first inside the component, back to start
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{sorted(component)} is not strongly connected")


def test_the_circle_finder_sees_module_and_function_level_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import a\n")
    (pkg / "a.py").write_text("from .sub import b\n")  # a -> sub.b, module level
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")  # sub.b -> c, in a function
    (pkg / "c.py").write_text("import pkg.a\nimport os\nfrom . import _native\n")  # c -> a: the circle a -> sub.b -> c -> a
    (pkg / f"_native{EXTENSION_SUFFIXES[0]}").write_bytes(b"")  # a compiled module: a node, no imports
    (pkg / "d.py").write_text("from pkg import a, VERSION\nfrom .sub import b as alias\n")  # no circle
    graph = import_graph(pkg, "pkg")
    assert graph["pkg.d"] == {"pkg", "pkg.a", "pkg.sub.b"} and graph["pkg.c"] == {"pkg.a", "pkg._native"}
    assert import_circles(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]
    (pkg / "c.py").write_text("import os\n")
    assert import_circles(import_graph(pkg, "pkg")) == []


def test_no_import_circles_in_the_package():
    circles = [" -> ".join(c) for c in import_circles(import_graph(PKG, "pycosdist"))]
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_bench_results_holds_results_only():
    """The scripts that produce results live in bench/ or scripts/; bench/results/ holds what they wrote."""
    results = Path(__file__).resolve().parents[2] / "bench" / "results"
    assert results.is_dir(), results
    scripts = [str(p.relative_to(results)) for p in results.rglob("*") if p.is_file()
               and (p.suffix in (".py", ".sh") or p.stat().st_mode & 0o111)]
    assert not scripts, f"scripts under bench/results/ (move them to bench/ or scripts/): {scripts}"
