"""Old import paths of the application modules, kept working for one version (0.2) with a warning.

Before 0.2 the denoising application lived beside the library (``pycosdist.training`` ...); it now
lives in :mod:`pycosdist.denoise`. ``import pycosdist.training`` still works: this finder aliases the
old name to the new module (the same module object, so state and ``isinstance`` checks agree) and
warns. Nothing is imported until an old name is asked for, so the library stays free of the
application's dependencies.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = ("audio", "cli", "config", "data", "distill", "evaluation", "experiment", "export", "models",
         "report", "synth", "training")


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, new_name: str):
        self.new_name = new_name

    def create_module(self, spec):
        return importlib.import_module(self.new_name)

    def exec_module(self, module):  # already executed under its new name
        pass


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package != "pycosdist" or name not in MOVED:
            return None
        new_name = f"pycosdist.denoise.{name}"
        warnings.warn(f"`{fullname}` moved to `{new_name}` in pycosdist 0.2; the old name will be removed in 0.3",
                      DeprecationWarning, stacklevel=3)
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new_name))


def install() -> None:
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
