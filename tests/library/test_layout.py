"""The library stands alone: `import pycosdist` needs torch + numpy only, no library module imports
the application (pycosdist.denoise), the 0.1 import paths still work with a warning, and the
command line without the [train] extra says what to install."""

from __future__ import annotations

import ast
import subprocess
import sys
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
